"""Numbers fixed by the RWKV-7 recipe and its kernel, each declared once (base layer: no imports)."""

MINI_EPOCH_SAMPLES = 40320  # samples per mini-epoch (rwkv-N.pth numbering, the data order's period)
WKV_CHUNK_LEN = 16  # the WKV7 kernel works in chunks of this many steps: ctx_len is a multiple of it
END_OF_DOC = 0  # the token after each document
