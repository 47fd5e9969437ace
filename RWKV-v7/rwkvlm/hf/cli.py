"""The command lines of RWKV-v7/export_hf.py and RWKV-v7/import_hf.py."""
from __future__ import annotations

import argparse

EXPORT_EPILOG = """examples:
  python RWKV-v7/export_hf.py out/L12-D768-x070/rwkv-final.pth hf/L12-D768
  python RWKV-v7/export_hf.py out/L12-D768-x070 hf/L12-D768     # the PROJ_DIR's newest weights

OUT_DIR gets config.json, model.safetensors, the tokenizer (the World one, or a char-level model's
vocab.json, found beside the weights, as tokenizer.json) and a README; load it with
flash-linear-attention 0.6.0 (AutoModelForCausalLM.from_pretrained(OUT_DIR, trust_remote_code=True)).
See RWKV-v7/docs/huggingface.md."""

IMPORT_EPILOG = """example:
  python RWKV-v7/import_hf.py hf/L12-D768 rwkv-imported.pth

The .pth loads in train.py --load_model, chat.py, evaluate.py and the rwkv pip package; for a folder
export_hf.py wrote it is the original checkpoint, bit for bit. A char-level model's vocab.json is
written beside it (refused if another vocab.json is there). See RWKV-v7/docs/huggingface.md."""


def export_main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="export_hf.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXPORT_EPILOG,
        description="Export an RWKV-7 (x070) checkpoint to a Hugging Face folder in flash-linear-attention's "
                    "RWKV7 layout.")
    p.add_argument("weights", help="an x070 .pth (e.g. PROJ_DIR/rwkv-final.pth, or a released RWKV-7 file), or a "
                                   "PROJ_DIR (its newest weights, as chat.py picks them)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="the folder to write: new, empty, or an earlier export "
                                                      "(replaced whole)")
    args = p.parse_args(argv)
    from rwkvlm.hf.convert import export_hf

    export_hf(args.weights, args.out_dir)
    return 0


def import_main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="import_hf.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=IMPORT_EPILOG,
        description="Convert a Hugging Face folder of flash-linear-attention's RWKV7ForCausalLM back to an x070 .pth "
                    "(the RWKV-LM layout).")
    p.add_argument("hf_dir", metavar="HF_DIR", help="a folder with config.json (model_type rwkv7) and "
                                                    "model.safetensors, e.g. what export_hf.py wrote")
    p.add_argument("out", metavar="OUT.pth", help="the .pth file to write (replaced if it exists)")
    args = p.parse_args(argv)
    from rwkvlm.hf.convert import import_hf

    import_hf(args.hf_dir, args.out)
    return 0
