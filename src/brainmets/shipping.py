"""Turn a finished training run into a shipped model folder, `models/<name>/`.

model.pt (the best epoch's weights and config, no optimizer), model.onnx, config.json, split.json,
log.jsonl, metrics.json (evaluation on the run's own test patients) and MODEL_CARD.md.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from brainmets.cache import Arrays
from brainmets.checkpoints import load_checkpoint, model_from_checkpoint, save_atomic
from brainmets.config import NETWORKS
from brainmets.evaluation import evaluate, predict_patients, tune_postprocessing
from brainmets.models import count_parameters
from brainmets.report import Run


def ship(run: Path, arrays: Arrays, out: Path, hardware: str, data_label: str, onnx: bool = True) -> dict:
    run, out = Path(run), Path(out)
    ckpt = load_checkpoint(run / "best.pt")
    model, cfg = model_from_checkpoint(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    # Post-processing is chosen on the validation patients, like the epoch; test stays unseen.
    val = ckpt["split"]["val"]
    tuned = tune_postprocessing(arrays, val, predict_patients(model, arrays, val, progress=True))
    cfg = dataclasses.replace(cfg, threshold=tuned["threshold"], min_lesion_px=tuned["min_lesion_px"])
    keep = ("model", "epoch", "best_val_dice", "split")
    save_atomic({**{k: ckpt[k] for k in keep}, "config": cfg.to_dict()}, out / "model.pt")
    cfg.save(out / "config.json")
    for name in ("split.json", "log.jsonl"):
        shutil.copyfile(run / name, out / name)
    test = ckpt["split"]["test"]
    metrics = {"model": cfg.name, "split": "test", "data": data_label, "checkpoint_epoch": ckpt["epoch"],
               "validation_tuning": tuned,
               **evaluate(model, arrays, test, cfg.threshold, progress=True, min_area=cfg.min_lesion_px)}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    if onnx:
        from brainmets.export import export_onnx

        export_onnx(out / "model.pt", out / "model.onnx")
    write_model_card(out, Run.load(cfg.name, out), count_parameters(model), ckpt["epoch"], hardware, data_label)
    return metrics


def write_model_card(folder: Path, run: Run, params: int, best_epoch: int, hardware: str, data_label: str) -> None:
    cfg, m = run.config, run.metrics
    split = json.loads((folder / "split.json").read_text())
    recipe = (f"{cfg.recipe} recipe: Adam lr {cfg.lr:g} ({cfg.lr_schedule}), batch {cfg.batch_size}, loss "
              f"{cfg.loss}, {'crops of ' + str(cfg.crop_size) + ' px' if cfg.crop_size else 'whole slices'}, "
              f"{cfg.empty_fraction:.0%} of empty slices per epoch, {'bf16 autocast' if cfg.bf16 else 'fp32'}, "
              f"augmentation: rotation ±{cfg.rotate_deg:g}°, zoom {cfg.scale[0]:g}–{cfg.scale[1]:g}, flips")
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    text = f"""# Model card: {cfg.name}

- **Network**: MONAI {NETWORKS[cfg.name].monai_class}, widths {list(cfg.model.widths)}, \
{params / 1e6:.2f} M parameters; input 3 × {cfg.preprocess.image_size}² (pre-contrast, FLAIR, post-contrast), \
output one lesion logit per pixel; threshold {cfg.threshold} on the sigmoid, then components under \
{cfg.min_lesion_px} px dropped per slice (both chosen on the validation patients: per-patient Dice \
{m['validation_tuning']['dice_per_patient_mean']:.3f} there).
- **Data**: {data_label}; split by patient (seed {split['seed']}): {len(split['train'])} train, \
{len(split['val'])} validation, {len(split['test'])} test patients (`split.json`).
- **Preprocessing**: CLAHE (clip {cfg.preprocess.clahe_clip}, {cfg.preprocess.clahe_tile}×{cfg.preprocess.clahe_tile} \
tiles) per channel, intensities to [0, 1] (`brainmets.preprocessing.preprocess`).
- **Training**: {recipe}. {len(run.log)} epochs in {run.train_minutes:.0f} minutes on {hardware}; best validation \
per-patient Dice {max(h['val_dice'] for h in run.log):.3f} at epoch {best_epoch} (the weights shipped).
- **Test metrics** ({m['patients']} patients, {m['slices']} slices, never seen in training or selection):
  Dice per patient mean {fmt(m['dice_per_patient_mean'])} (median {fmt(m['dice_per_patient_median'])}), \
Dice per lesion slice {fmt(m['dice_lesion_slices_mean'])}, pooled Dice {fmt(m['dice_pooled'])}, IoU \
{fmt(m['iou_pooled'])}, precision {fmt(m['precision_pooled'])}, recall {fmt(m['recall_pooled'])}, HD95 \
{fmt(m['hd95_px_mean'])} px, lesion sensitivity {fmt(m['lesion_sensitivity'])}, \
{fmt(m['lesion_fp_per_patient'])} false-positive lesions per patient. Full report: `metrics.json`.
- **Reproduce**: `brainmets evaluate --data <Data.zip of the test patients> --model {cfg.name} --split all`.
- **Known limits**: trained on {len(split['train'])} patients of one public collection (TCGA lower-grade \
glioma, 5 institutions, FLAIR-abnormality masks by one reader); not validated on metastases, other scanners \
or protocols; 2-D slice by slice, so no 3-D context; research use only, not a medical device.
"""
    (folder / "MODEL_CARD.md").write_text(text)
