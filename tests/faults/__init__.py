"""Fault injection from outside the processes under test: an HTTP proxy between them and
the emulator (``proxy.FaultProxy``), and the tests of buildq under AWS faults."""
