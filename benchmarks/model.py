"""Whole-model speed on this machine: this package vs Hugging Face transformers, same weights.

Two cases, each timed side by side in one process (interleaved, median of the repeats):
- inference: the r50 preset, batch 1, one 800 x 1066 image, ``torch.no_grad``;
- training step: the tiny preset (box refinement) at ResNet-18's full width, the only one transformers
  builds, batch 8 at 192 x 192, forward, a surrogate loss on the final outputs, backward and an
  AdamW step (transformers' loss is not ours; the step with our real loss, as the trainer takes it,
  is timed by ``train_step.py``).
Ours runs twice, with the fused CPU kernel and with the reference op, so the op's share shows.
transformers is optional: without it only our two paths are timed.

    python benchmarks/model.py [--repeats 3] [--threads N] [--skip-inference] [--skip-training]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from deformable_detr import ModelConfig, build_model, get_config
from deformable_detr.environment import machine_summary
from deformable_detr.huggingface import state_dict_from_huggingface
from deformable_detr.ops import use_implementation


def contenders(config: ModelConfig, with_huggingface: bool):
    """Our model of ``config`` and, if asked, a transformers twin holding the same random weights."""
    if not with_huggingface:
        return build_model(config), None
    import transformers

    hf_config = transformers.DeformableDetrConfig(
        use_timm_backbone=True,
        backbone=config.backbone,
        use_pretrained_backbone=False,
        num_feature_levels=config.num_feature_levels,
        d_model=config.d_model,
        encoder_layers=config.encoder_layers,
        decoder_layers=config.decoder_layers,
        encoder_attention_heads=config.num_heads,
        decoder_attention_heads=config.num_heads,
        encoder_ffn_dim=config.dim_feedforward,
        decoder_ffn_dim=config.dim_feedforward,
        num_queries=config.num_queries,
        with_box_refine=config.with_box_refine,
        two_stage=config.two_stage,
        num_labels=config.num_classes,
        auxiliary_loss=False,
    )
    hf_model = transformers.DeformableDetrForObjectDetection(hf_config)
    ours = build_model(config)
    ours.load_state_dict(state_dict_from_huggingface(hf_model.state_dict(), config))
    return ours, hf_model


def median_times(functions: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    for function in functions.values():  # warm-up
        function()
    times: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def ours_with(implementation: str, function: Callable[[], None]) -> Callable[[], None]:
    def run() -> None:
        with use_implementation(implementation):
            function()

    return run


def report(
    title: str, times: dict[str, float], unit: str, images_per_step: int | None = None,
    baseline: str = "ours (fused op)",
) -> None:
    print(f"\n{title}")
    width = max(28, *map(len, times))
    for name, seconds in times.items():
        throughput = f" {images_per_step / seconds:7.1f} images/s" if images_per_step else ""
        print(f"  {name:{width}s} {seconds:8.3f} s/{unit}{throughput}"
              f"   {seconds / times[baseline]:5.2f}x the time of {baseline}")


def inference(repeats: int, with_huggingface: bool) -> None:
    config = get_config("r50")
    images = torch.randn(1, 3, 800, 1066)
    ours, hf_model = contenders(config, with_huggingface)
    ours.eval()

    def run_ours() -> None:
        with torch.no_grad():
            ours(images)

    functions = {"ours (fused op)": ours_with("auto", run_ours), "ours (reference op)": ours_with("reference", run_ours)}
    if with_huggingface:
        pixel_mask = torch.ones(1, 800, 1066, dtype=torch.long)

        def run_hf() -> None:
            with torch.no_grad():
                hf_model(pixel_values=images, pixel_mask=pixel_mask)

        hf_model.eval()
        functions["transformers"] = run_hf
    report("r50 inference, 1 x 3 x 800 x 1066", median_times(functions, repeats), "image")


def training(repeats: int, with_huggingface: bool) -> None:
    # At ResNet-18's full width: transformers' timm ResNets have no other.
    config = get_config("tiny", backbone_width=64)
    images = torch.randn(8, 3, 192, 192)
    ours, hf_model = contenders(config, with_huggingface)
    ours.train()

    def surrogate_loss(logits: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        return logits.sigmoid().mean() + boxes.mean()

    ours_optimizer = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4)

    def run_ours() -> None:
        outputs = ours(images)
        surrogate_loss(outputs["pred_logits"], outputs["pred_boxes"]).backward()
        ours_optimizer.step()
        ours_optimizer.zero_grad()

    functions = {"ours (fused op)": ours_with("auto", run_ours), "ours (reference op)": ours_with("reference", run_ours)}
    if with_huggingface:
        hf_model.train()
        hf_optimizer = torch.optim.AdamW([p for p in hf_model.parameters() if p.requires_grad], lr=1e-4)
        pixel_mask = torch.ones(8, 192, 192, dtype=torch.long)

        def run_hf() -> None:
            outputs = hf_model(pixel_values=images, pixel_mask=pixel_mask)
            surrogate_loss(outputs.logits, outputs.pred_boxes).backward()
            hf_optimizer.step()
            hf_optimizer.zero_grad()

        functions["transformers"] = run_hf
    report("tiny training step, 8 x 3 x 192 x 192", median_times(functions, repeats), "step", images_per_step=8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--skip-training", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    try:
        import transformers  # noqa: F401

        with_huggingface = True
    except ImportError:
        with_huggingface = False
    print(f"{machine_summary()}; median of {args.repeats}" + ("" if with_huggingface else "; transformers not installed"))
    if not args.skip_inference:
        inference(args.repeats, with_huggingface)
    if not args.skip_training:
        training(args.repeats, with_huggingface)


if __name__ == "__main__":
    main()
