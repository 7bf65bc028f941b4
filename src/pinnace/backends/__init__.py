"""Virtual machine monitors pinnace can drive; QEMU is the one there is today."""
