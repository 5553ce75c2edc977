"""Stand-in for flash_attn, which OpenRLHF's model module imports at load time (ring_attn_utils) but calls
only for packed samples or ring attention, neither of which the consumer tests use. Only on sys.path
inside test_consumers.py's OpenRLHF fixture."""
