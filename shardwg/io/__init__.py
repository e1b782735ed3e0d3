"""I/O wrappers around the protocol core: TUN queues, UDP sockets, netlink."""
