"""The pure half of initiation admission: estimates, shares and the flood flag."""

from __future__ import annotations

from shardwg.proto.admission import (
    MAX_SHIFT,
    UNDER_LOAD_FAILED_RATE,
    UNDER_LOAD_OFFERED_RATE,
    UPDATE_INTERVAL,
    InitiationAdmission,
)

TARGET = 3000.0


def feed(adm: InitiationAdmission, offered_per_s: float, t: float, under_load: bool) -> bool:
    """Up to `t`, `offered_per_s` arrived and the kernel admitted adm.share of them."""
    since = adm._since if adm._since is not None else t
    adm.counted = int(offered_per_s * (t - since) * adm.share)
    return adm.update(t, under_load)


def test_first_update_only_starts_the_clock() -> None:
    adm = InitiationAdmission(TARGET)
    adm.counted = 10_000
    assert adm.update(5.0, True) is False
    assert adm.shift == 0


def test_no_estimate_before_the_interval_is_over() -> None:
    adm = InitiationAdmission(TARGET)
    adm.update(0.0, True)
    adm.counted = 10_000
    assert adm.update(UPDATE_INTERVAL / 2, True) is False
    assert adm.counted == 10_000 and adm.shift == 0


def test_share_brings_admitted_rate_down_to_the_target() -> None:
    adm = InitiationAdmission(TARGET)
    adm.update(0.0, False)
    assert feed(adm, 20_000, UPDATE_INTERVAL, True) is True
    assert adm.offered_rate == 20_000
    assert adm.shift == 3  # 20000/8 = 2500 <= 3000 < 20000/4
    assert 20_000 * adm.share <= TARGET < 20_000 * adm.share * 2


def test_estimate_accounts_for_what_the_kernel_filtered() -> None:
    adm = InitiationAdmission(TARGET)
    adm.update(0.0, False)
    feed(adm, 40_000, 0.25, True)
    shift = adm.shift
    # the flood goes on: the worker only sees 1/2**shift of it, the estimate stays right
    assert feed(adm, 40_000, 0.50, True) is False
    assert abs(adm.offered_rate - 40_000) < 40_000 * 0.01
    assert adm.shift == shift


def test_a_shedding_worker_stays_under_load_while_the_flood_lasts() -> None:
    """Once the kernel sheds the flood the handshake queue stays short; the estimate must keep
    the worker under load, or the filter would come off and the flood back in."""
    adm = InitiationAdmission(TARGET)
    adm.update(0.0, False)
    feed(adm, UNDER_LOAD_OFFERED_RATE * 4, UPDATE_INTERVAL, True)  # the queue said so
    assert adm.flooded() and adm.shift > 0
    for i in range(2, 10):  # the queue no longer says so
        feed(adm, UNDER_LOAD_OFFERED_RATE * 4, UPDATE_INTERVAL * i, False)
        assert adm.flooded() and adm.shift > 0


def test_an_honest_burst_the_worker_keeps_up_with_is_not_a_flood() -> None:
    """Under-load is entered by a deep queue (wireguard-go's rule), not by a rate: a handshake
    benchmark or a mass rekey at a few thousand per second must get full handshakes."""
    adm = InitiationAdmission(TARGET)
    adm.update(0.0, False)
    for i in range(1, 10):
        assert feed(adm, UNDER_LOAD_OFFERED_RATE * 4, UPDATE_INTERVAL * i, False) is False
        assert adm.shift == 0 and not adm.flooded()


def test_below_the_target_nothing_is_filtered_even_under_load() -> None:
    adm = InitiationAdmission(TARGET)
    adm.update(0.0, False)
    assert feed(adm, TARGET * 0.9, UPDATE_INTERVAL, True) is False
    assert adm.shift == 0 and not adm.flooded()  # cookies are required, nothing is filtered


def test_honest_rekey_burst_below_the_flood_rate_is_not_filtered_when_not_under_load() -> None:
    adm = InitiationAdmission(TARGET / 4)
    adm.update(0.0, False)
    feed(adm, UNDER_LOAD_OFFERED_RATE / 2, UPDATE_INTERVAL, False)
    assert adm.shift == 0


def test_filter_comes_off_when_the_flood_ends() -> None:
    adm = InitiationAdmission(TARGET)
    adm.update(0.0, False)
    feed(adm, 50_000, 0.25, True)
    assert adm.shift > 0
    assert feed(adm, 0, 0.5, False) is True
    assert adm.shift == 0 and adm.share == 1.0 and not adm.flooded()


def test_share_never_below_the_floor() -> None:
    adm = InitiationAdmission(TARGET)
    adm.update(0.0, False)
    feed(adm, 1e12, UPDATE_INTERVAL, True)
    assert adm.shift == MAX_SHIFT


def test_failing_initiations_put_a_worker_that_keeps_up_under_load() -> None:
    """A spoofed flood a fast worker keeps up with never deepens its queue, but every one of
    its initiations fails after the DH work: that alone must engage shedding."""
    adm = InitiationAdmission(TARGET)
    adm.update(0.0, False)
    adm.counted = int(10_000 * UPDATE_INTERVAL)
    adm.failed = int(9_000 * UPDATE_INTERVAL)
    assert adm.update(UPDATE_INTERVAL, False) is True
    assert adm.failing() and adm.shift > 0


def test_a_few_failures_are_not_a_flood() -> None:
    adm = InitiationAdmission(TARGET)
    adm.update(0.0, False)
    adm.counted = int(4_000 * UPDATE_INTERVAL)  # a benchmark: many initiations, all good
    adm.failed = int(UNDER_LOAD_FAILED_RATE / 2 * UPDATE_INTERVAL)
    assert adm.update(UPDATE_INTERVAL, False) is False
    assert not adm.failing() and adm.shift == 0
