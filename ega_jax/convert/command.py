"""Converts a PyTorch teacher checkpoint into a Flax teacher directory.

  ega-convert --arch auto --checkpoint ViT-B-32.pt --output teachers/vit_b32

The same command is `python -m ega_jax.convert ...` and, in a checkout,
`python -m launch.convert_teacher ...`.

Writes OUTPUT/variables.msgpack and OUTPUT/teacher.json; training reads them with
ega_jax.models.load_teacher(OUTPUT). See docs/converting.md for every checkpoint family.
"""

import argparse
import sys

from ega_jax.convert import ARCH_CHOICES, ConversionError, convert_checkpoint


def _three_numbers(values: list[str]) -> list[float]:
  """Accepts '--mean 0.5 0.5 0.5' or '--mean 0.5,0.5,0.5'."""
  numbers = [part for value in values for part in value.split(",") if part]
  try:
    return [float(number) for number in numbers]
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected numbers, got {values}") from None


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
    prog="ega-convert",
    description="Convert a PyTorch teacher checkpoint (OpenAI CLIP, Hugging Face CLIP, "
    "torchvision-layout ResNet, timm/DINO ViT) into a Flax teacher directory.",
  )
  parser.add_argument(
    "--arch",
    default="auto",
    choices=ARCH_CHOICES,
    metavar="NAME",
    help="teacher architecture, or auto to infer it from the checkpoint "
    f"(one of: {', '.join(ARCH_CHOICES)})",
  )
  parser.add_argument(
    "--checkpoint",
    required=True,
    help=".pt/.pth/.pth.tar/.bin state dict (plain, wrapped or TorchScript) or .safetensors file",
  )
  parser.add_argument("--output", required=True, help="directory to write the teacher into")
  parser.add_argument(
    "--prefix",
    default="auto",
    help="key prefix in front of the backbone's keys: auto (default), none, or "
    "a literal such as 'module.encoder_q.'",
  )
  parser.add_argument(
    "--image_size", type=int, default=None, help="input resolution to record (default: the arch's)"
  )
  parser.add_argument(
    "--mean",
    nargs="+",
    default=None,
    metavar="M",
    help="per-channel RGB mean to record (default: the arch's)",
  )
  parser.add_argument(
    "--std",
    nargs="+",
    default=None,
    metavar="S",
    help="per-channel RGB std to record (default: the arch's)",
  )
  parser.add_argument(
    "--allow_pickle",
    action="store_true",
    help="load torch.save files with weights_only=False (trusted files only)",
  )
  return parser


def main(argv: list[str] | None = None) -> int:
  """Console-script entry point (ega-convert); returns the exit status."""
  parser = build_parser()
  args = parser.parse_args(argv)
  try:
    mean = None if args.mean is None else _three_numbers(args.mean)
    std = None if args.std is None else _three_numbers(args.std)
  except argparse.ArgumentTypeError as error:
    parser.error(str(error))
  try:
    convert_checkpoint(
      args.checkpoint,
      args.output,
      arch=args.arch,
      prefix=args.prefix,
      image_size=args.image_size,
      mean=mean,
      std=std,
      allow_pickle=args.allow_pickle,
    )
  except ConversionError as error:
    print(f"convert_teacher: error: {error}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
