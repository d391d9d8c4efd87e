"""clipalign export: write a run's model as an open_clip checkpoint + model config."""
from __future__ import annotations

import argparse

from clipalign.cli.common import CliError, add_model_args, model_source_of, parser

_EPILOG = """\
Use the export from plain open_clip (no clipalign needed):
  import open_clip
  open_clip.add_model_config("DIR")
  model, _, preprocess = open_clip.create_model_and_transforms("NAME", pretrained="DIR/NAME.safetensors")
  tokenizer = open_clip.get_tokenizer("NAME")

or with CLIP_benchmark:
  python scripts/clip_benchmark_eval.py DIR eval --model NAME --pretrained DIR/NAME.safetensors ...
"""


def build_parser() -> argparse.ArgumentParser:
    p = parser("export", "Write a run's model (or pretrained weights: --model/--pretrained) for plain open_clip:\n"
               "  DIR/NAME.json         the open_clip model config\n"
               "  DIR/NAME.safetensors  the open_clip state dict only (no MLM head, optimizer or training state)\n"
               "open_clip then gives the same image and text embeddings as clipalign.")
    p.epilog = _EPILOG
    p.formatter_class = argparse.RawDescriptionHelpFormatter  # keep the code lines as written
    p.add_argument("run", metavar="RUN", nargs="?", default=None,
                   help="checkpoint file, or a run folder (its latest checkpoint); or give --model/--pretrained")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write NAME.json and NAME.safetensors into")
    p.add_argument("--format", choices=["open_clip", "hf", "onnx"], default="open_clip",
                   help="open_clip: NAME.json + NAME.safetensors; hf: a transformers CLIPModel folder (config.json, "
                        "model.safetensors, tokenizer and image-processor files) for CLIPModel.from_pretrained(DIR); "
                        "onnx: image.onnx + text.onnx (dynamic batch, checked with onnxruntime) + onnx.json")
    p.add_argument("--name", default=None,
                   help="model name for open_clip's registry and the file names (default: the run's model name)")
    add_model_args(p, checkpoint=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source = model_source_of(args, checkpoint=args.run)
    from clipalign.export import export_hf, export_open_clip

    try:
        if args.format == "onnx":
            from clipalign.export_onnx import export_onnx

            info = export_onnx(source, args.out)
        elif args.format == "hf":
            info = export_hf(source, args.out)
        else:
            info = export_open_clip(source, args.out, name=args.name)
    except (FileNotFoundError, ValueError) as err:
        raise CliError(str(err)) from None
    step = f" (step {info['step']})" if info["step"] is not None else ""
    print(f"exported {info['model_name']}{step} from {info['checkpoint']} as {info['name']!r}")
    if args.format == "onnx":
        diffs = ", ".join(f"{t} {v['max_abs_diff']:.1e}" for t, v in info["info"]["towers"].items())
        print(f"folder:  {info['folder']}  (image.onnx, text.onnx; onnxruntime vs torch max abs diff: {diffs})")
        return 0
    if args.format == "hf":
        print(f"folder:  {info['folder']}  (transformers.CLIPModel.from_pretrained)")
    else:
        print(f"config:  {info['config']}")
    print(f"weights: {info['weights']}")
    return 0
