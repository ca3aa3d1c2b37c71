"""``vlp convert albef|meter|flava|openflamingo``: official checkpoints → vlp state dicts."""

from __future__ import annotations

import argparse


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlp convert", description="Convert other code bases' checkpoints to vlp.")
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("albef", help="an ALBEF / LAVIS ALBEF checkpoint -> a vlp ALBEF state dict")
    a.add_argument("ckpt", help="ALBEF or LAVIS checkpoint (.pth), read with torch.load(weights_only=True)")
    a.add_argument("--out", required=True, help="output file: *.safetensors, or a torch file ({'state_dict': ...})")
    a.add_argument(
        "--config",
        default=None,
        help="recipe YAML whose model to fill (default: a model with the checkpoint's shapes, printed as a recipe)",
    )
    a.add_argument("--head-dim", type=int, default=64, help="attention head width when inferring the model (64)")
    a.add_argument("--strict", action="store_true", help="fail unless every key is known and every weight filled")
    m = sub.add_parser("meter", help="a METER (zdou0830/METER, CLIP-ViT) checkpoint -> a vlp METER state dict")
    m.add_argument("ckpt", help="METER Lightning checkpoint (.ckpt), read with torch.load(weights_only=True)")
    m.add_argument("--out", required=True, help="output file: *.safetensors, or a torch file ({'state_dict': ...})")
    m.add_argument(
        "--config",
        default=None,
        help="recipe YAML whose model to fill, built without its pretrained weights (default: the checkpoint's "
        "architecture with the other settings of recipes/meter_clip16_roberta.yaml, printed as a recipe)",
    )
    m.add_argument(
        "--head-dim", type=int, default=64, help="attention head width where the checkpoint's config does not say (64)"
    )
    m.add_argument(
        "--strict",
        action="store_true",
        help="fail unless every key is known, every weight filled and the model computes what METER computes",
    )
    f = sub.add_parser("flava", help="a FLAVA (transformers or TorchMultimodal) checkpoint -> a vlp FLAVA state dict")
    f.add_argument(
        "ckpt",
        help="FlavaForPreTraining / flava_model_for_pretraining state dict: *.safetensors, or a torch file "
        "read with torch.load(weights_only=True)",
    )
    f.add_argument("--out", required=True, help="output file: *.safetensors, or a torch file ({'state_dict': ...})")
    f.add_argument(
        "--config",
        default=None,
        help="recipe YAML whose model to fill (default: a model with the checkpoint's shapes, printed as a recipe)",
    )
    f.add_argument("--head-dim", type=int, default=64, help="attention head width when inferring the model (64)")
    f.add_argument("--strict", action="store_true", help="fail unless every key is known and every weight filled")
    o = sub.add_parser("openflamingo", help="an OpenFlamingo checkpoint -> the trained tensors of a vlp Flamingo")
    o.add_argument(
        "ckpt", help="OpenFlamingo checkpoint (*.safetensors, or a torch file: a state dict or model_state_dict)"
    )
    o.add_argument("--config", required=True, help="recipe YAML of the vlp Flamingo (its towers, sizes and tokenizer)")
    o.add_argument("--out", required=True, help="output file: *.safetensors, or a torch file ({'state_dict': ...})")
    o.add_argument(
        "--media-token-id", type=int, default=None, help="the checkpoint's <image> id (OpenFlamingo's order)"
    )
    o.add_argument("--eoc-token-id", type=int, default=None, help="the checkpoint's <|endofchunk|> id")
    o.add_argument("--strict", action="store_true", help="fail unless every key is known and every weight filled")
    return parser


def convert_main(args: list[str]) -> object:
    ns = _parser().parse_args(args)
    if ns.command == "openflamingo":
        from vlp.convert.openflamingo import convert_openflamingo

        report = convert_openflamingo(
            ns.ckpt,
            ns.out,
            ns.config,
            media_token_id=ns.media_token_id,
            eoc_token_id=ns.eoc_token_id,
            strict=ns.strict,
        )
        print(report.summary())
        print(f"\nwrote {ns.out}")
        return report
    if ns.command == "meter":
        from vlp.convert.meter import convert_meter as convert
    elif ns.command == "flava":
        from vlp.convert.flava import convert_flava as convert
    else:
        from vlp.convert.albef import convert_albef as convert

    report = convert(ns.ckpt, ns.out, ns.config, head_dim=ns.head_dim, strict=ns.strict)
    print(report.summary())
    if report.recipe is not None:
        import yaml

        print("\nmodel built from the checkpoint's shapes; its recipe section (add the objectives' settings you need):")
        print(yaml.safe_dump({"model": report.recipe}, sort_keys=False).rstrip())
    print(f"\nwrote {ns.out}")
    return report
