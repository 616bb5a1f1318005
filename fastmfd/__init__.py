"""fastmfd: QEMU's multifd migration transport, rebuilt as a library."""
