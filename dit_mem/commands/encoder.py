"""``dit-mem encoder``: inspect presets and convert the release's checkpoint."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encoder", help="memory encoder: presets, info, checkpoint conversion")
    cmds = p.add_subparsers(dest="encoder_command", metavar="ACTION", required=True)

    info = cmds.add_parser("info", help="print a preset's config, grid and parameter count")
    info.add_argument(
        "--preset",
        default="wan2.1-1.3b",
        help="wan2.1-1.3b (the paper's), wan2.1-14b, wan2.2-ti2v-5b, wan2.2-a14b, ltx-video-2b, "
        "hunyuanvideo-1.5, tiny, toyworld",
    )
    info.set_defaults(func=_info)

    conv = cmds.add_parser(
        "convert-official",
        help="convert the release's DiT-Mem-1.3B.safetensors into a save_pretrained folder",
    )
    conv.add_argument("checkpoint", help="path to DiT-Mem-1.3B.safetensors")
    conv.add_argument("--out", required=True, help="output folder (config.json + weights)")
    conv.set_defaults(func=_convert)


def _info(args: argparse.Namespace) -> int:
    from dit_mem.memory import PRESET_FAMILY, MemoryEncoder

    model = MemoryEncoder.from_preset(args.preset)
    family = PRESET_FAMILY.get(args.preset, "tiny worlds")
    print(f"preset {args.preset} ({family}): {dict(model.config)}")
    print(f"CNN grid (T', H', W') at latent {model.config.latent_shape}: {model.grid}")
    print(f"parameters: {sum(p.numel() for p in model.parameters()):,}")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from dit_mem.memory import MemoryEncoder

    model = MemoryEncoder.from_official_checkpoint(args.checkpoint)
    model.save_pretrained(args.out)
    print(f"wrote {args.out} (config.json + diffusion_pytorch_model.safetensors)")
    return 0
