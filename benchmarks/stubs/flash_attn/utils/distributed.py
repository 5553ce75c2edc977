"""The name OpenRLHF imports from flash_attn.utils.distributed; calling it is an error."""


def all_gather(*args, **kwargs):
    raise NotImplementedError("flash_attn is a test stand-in here: ring attention needs the real package")
