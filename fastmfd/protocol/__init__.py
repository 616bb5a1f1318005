"""What both ends of a migration must agree on: SETUP, the main channel, worker parameters and reports, addresses and the channel handshake, QEMU's stream."""
