"""Wire constants, protocol timers and the closed set of drop reasons.

Values come from the WireGuard paper and wireguard-go's `device/constants.go`
(see PROTOCOL.md in the steering repo). Times are float seconds.
"""

from __future__ import annotations

from enum import IntEnum

CONSTRUCTION = b"Noise_IKpsk2_25519_ChaChaPoly_BLAKE2s"
IDENTIFIER = b"WireGuard v1 zx2c4 Jason@zx2c4.com"
LABEL_MAC1 = b"mac1----"
LABEL_COOKIE = b"cookie--"

KEY_LEN = 32
TAG_LEN = 16
MAC_LEN = 16
COOKIE_LEN = 16
COOKIE_NONCE_LEN = 24
TIMESTAMP_LEN = 12


class MessageType(IntEnum):
    """The first byte of every datagram (followed by three zero bytes)."""

    INITIATION = 1
    RESPONSE = 2
    COOKIE_REPLY = 3
    TRANSPORT = 4


# Sizes and offsets of the four messages (all integers little-endian).
INITIATION_SIZE = 148
RESPONSE_SIZE = 92
COOKIE_REPLY_SIZE = 64
TRANSPORT_HEADER_SIZE = 16
TRANSPORT_MIN_SIZE = TRANSPORT_HEADER_SIZE + TAG_LEN  # a keepalive
KEEPALIVE_SIZE = TRANSPORT_MIN_SIZE

INITIATION_MAC1_OFFSET = 116
INITIATION_MAC2_OFFSET = 132
RESPONSE_MAC1_OFFSET = 60
RESPONSE_MAC2_OFFSET = 76

TRANSPORT_OFFSET_RECEIVER = 4
TRANSPORT_OFFSET_COUNTER = 8
TRANSPORT_OFFSET_CONTENT = 16
RESPONSE_OFFSET_RECEIVER = 8
COOKIE_REPLY_OFFSET_RECEIVER = 4

PADDING_MULTIPLE = 16
DEFAULT_MTU = 1420
# Largest datagram we ever receive or build: an IPv6 jumbo-free 64 KiB IP packet plus our header.
MAX_DATAGRAM = 65535 + TRANSPORT_MIN_SIZE

# Timers and limits (seconds / counts).
REKEY_AFTER_MESSAGES = 1 << 60
REJECT_AFTER_MESSAGES = (1 << 64) - (1 << 13) - 1
REKEY_AFTER_TIME = 120.0
REJECT_AFTER_TIME = 180.0
REKEY_ATTEMPT_TIME = 90.0
REKEY_TIMEOUT = 5.0
REKEY_TIMEOUT_JITTER_MAX = 0.334
KEEPALIVE_TIMEOUT = 10.0
COOKIE_REFRESH_TIME = 120.0
HANDSHAKE_INITIATION_RATE = 0.020  # at most one accepted initiation per peer per 20 ms
# An initiator that receives on a session this old starts a new handshake.
REKEY_ON_RECEIVE_AGE = REJECT_AFTER_TIME - KEEPALIVE_TIMEOUT - REKEY_TIMEOUT
ZERO_KEYS_AFTER = 3 * REJECT_AFTER_TIME
MAX_TIMER_HANDSHAKES = int(REKEY_ATTEMPT_TIME / REKEY_TIMEOUT)  # 18 retries before giving up

REPLAY_WINDOW = 8128  # counters accepted behind the highest seen (RFC 6479, 128 blocks of 64)
MAX_STAGED_PACKETS = 128  # packets held per peer while waiting for a session

# Under load (cookie replies instead of responses).
UNDER_LOAD_QUEUE_SIZE = 128
UNDER_LOAD_AFTER_TIME = 1.0
RATELIMIT_PACKETS_PER_SECOND = 20
RATELIMIT_BURST = 5


class DropReason(IntEnum):
    """Why a packet was discarded. Counted per worker; never raised on the hot path."""

    TOO_SHORT = 0
    BAD_TYPE = 1
    BAD_SIZE = 2
    BAD_MAC1 = 3
    COOKIE_REQUIRED = 4
    RATE_LIMITED = 5
    HANDSHAKE_DECRYPT = 6
    UNKNOWN_PEER = 7
    STALE_TIMESTAMP = 8
    INITIATION_FLOOD = 9
    UNKNOWN_INDEX = 10
    DECRYPT_FAILED = 11
    REPLAYED = 12
    KEY_EXPIRED = 13
    BAD_INNER_PACKET = 14
    SOURCE_NOT_ALLOWED = 15
    NO_ROUTE = 16
    NO_ENDPOINT = 17
    STAGED_OVERFLOW = 18
    SEND_ERROR = 19
    TUN_WRITE_ERROR = 20
    HANDOFF_FULL = 21
    BAD_COOKIE_REPLY = 22
    UNEXPECTED_RESPONSE = 23
    INTERNAL_ERROR = 24
    HANDSHAKE_QUEUE_FULL = 25  # handshake backlog at its bound: dropped before any work
    NOT_PUBLISHED = 26  # the record covering its counter or timestamp could not be written
    BAD_INNER_CHECKSUM = 27  # a decrypted TCP/UDP packet whose checksum does not verify


DROP_REASON_COUNT = len(DropReason)
