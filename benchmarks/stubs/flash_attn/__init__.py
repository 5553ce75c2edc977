"""Stand-in for flash_attn, which OpenRLHF's model module imports at load time (ring_attn_utils) but calls
only for packed samples or ring attention, neither of which benchmarks/consumers.py uses, which puts these
modules in sys.modules under their own names where no flash_attn is installed."""
