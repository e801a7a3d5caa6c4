"""Pure logic: no I/O, no event loop, no clock reads (time is passed in as ``now``)."""
