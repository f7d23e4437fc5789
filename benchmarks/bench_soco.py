"""SoCo pretraining throughput: proposals cached on disk vs selective search every time (issue 7).

On 10 synthetic 128 px images (real COCO files), 1 thread:

(a) the data pipeline alone (image -> proposals -> three augmented views), images/s;
(b) a whole pretraining step (data + online/target forward, backward, SGD, EMA update),
    images/s, at the specified view sizes 224/112 and MLP widths 4096/256;
(c) the pretraining step at smoke-suite sizes (resnet18, FPN 64, batch 8), ms/step and
    the resulting pretrain-stage time for the smoke suite's 160 images, to pick its settings.

"Cached": proposals read from the on-disk cache (filled in a warm-up pass), as from a
second run or epoch 2 on. "Uncached": selective search on every image every time.
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

N_IMAGES, IMAGE_SIZE = 10, 128


class _Uncached(torch.utils.data.Dataset):
    """A SoCoViews whose proposals are recomputed on every access."""

    def __init__(self, views):
        self.views = views

    def __len__(self):
        return len(self.views)

    def __getitem__(self, i):
        self.views.store._memory.clear()
        return self.views[i]


def _setup(tmp: Path):
    from harness.data import CocoDetection, load_coco, write_synthetic_coco
    ann = write_synthetic_coco(tmp / "train", n_images=N_IMAGES, seed=0, image_size=IMAGE_SIZE)
    return CocoDetection(load_coco(ann, ann.parent))


def _datasets(method, source, tmp: Path):
    from methods.soco_data import ProposalStore, SoCoViews
    cached = SoCoViews(source, method.view_builder(), ProposalStore(method.proposal_params(), tmp / "cache"))
    for i in range(len(cached)):  # fill the disk cache
        cached[i]
    cached = SoCoViews(source, method.view_builder(), ProposalStore(method.proposal_params(), tmp / "cache"))
    uncached = _Uncached(SoCoViews(source, method.view_builder(), ProposalStore(method.proposal_params(), None)))
    return cached, uncached


def _data_rate(data, reps: int = 3) -> float:
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for i in range(len(data)):
            data[i]
        rates.append(len(data) / (time.perf_counter() - t0))
    return statistics.median(rates)


class _Trainer:
    """One pretraining model + optimiser; ``steps(data, batch)`` times an epoch of steps over ``data``."""

    def __init__(self, method, detector, steps_per_epoch: int, epochs: int = 10):
        from harness.config import ScheduleSpec
        from harness.plugin import StageContext
        self.method = method
        self.ctx = StageContext(stage="pretrain", detector=detector, arch="faster_rcnn",
                                schedule=ScheduleSpec(epochs=epochs), num_classes=3, class_names=["a", "b", "c"],
                                device=torch.device("cpu"), seed=0, steps_per_epoch=steps_per_epoch)
        torch.manual_seed(0)
        self.model = method.build_model("pretrain", self.ctx).train()
        self.opt = torch.optim.SGD([p for p in self.model.parameters() if p.requires_grad], lr=0.02, momentum=0.9)

    def steps(self, data, batch: int) -> list[float]:
        from methods.soco_data import stack_views
        times = []
        for s in range(0, len(data) - batch + 1, batch):
            t0 = time.perf_counter()
            loss = self.model(stack_views([data[i][0] for i in range(s, s + batch)]))["byol"]
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            self.method.after_step("pretrain", self.model, self.ctx)
            times.append(time.perf_counter() - t0)
            self.ctx.step_in_epoch = (self.ctx.step_in_epoch + 1) % self.ctx.steps_per_epoch
            self.ctx.epoch += self.ctx.step_in_epoch == 0
        return times


def main() -> None:
    import cv2

    from harness.config import DetectorSpec
    from methods.soco import SoCo
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        source = _setup(tmp)
        spec = SoCo()
        cached, uncached = _datasets(spec, source, tmp)
        print(f"{N_IMAGES} synthetic {IMAGE_SIZE} px images, 1 thread, selective search "
              f"(scale 300, sigma 0.9, min_size 100):")
        t0 = time.perf_counter()
        for i in range(len(source)):
            uncached.views.store.compute(source[i][0])
        print(f"    selective search + filter alone   {1000 * (time.perf_counter() - t0) / N_IMAGES:8.1f} ms/image")
        print("(a) data pipeline (proposals + 3 views at 224/112), images/s:")
        a_c, a_u = _data_rate(cached), _data_rate(uncached)
        print(f"    cached proposals {a_c:8.1f}   selective search each time {a_u:8.1f}   ratio {a_c / a_u:5.2f}")

        det = DetectorSpec(backbone="resnet18", fpn_width=64, image_size=IMAGE_SIZE)
        print("(b) pretraining step (r18/FPN64, views 224/112, MLP 4096/256, batch 5), images/s "
              "(median step, 3 alternating rounds):")
        trainer, per = _Trainer(spec, det, steps_per_epoch=2), {"c": [], "u": []}
        trainer.steps(cached, 5)  # warm-up
        for _ in range(3):
            per["c"] += trainer.steps(cached, 5)
            per["u"] += trainer.steps(uncached, 5)
        b_c, b_u = (5 / statistics.median(per[k]) for k in ("c", "u"))
        print(f"    cached proposals {b_c:8.2f}   selective search each time {b_u:8.2f}   ratio {b_c / b_u:5.2f}")
        big = torch.nn.functional.interpolate(source[0][0][None], size=(640, 640), mode="bilinear")[0]
        t0 = time.perf_counter()
        uncached.views.store.compute(big)
        print(f"    (for scale: selective search on one 640 px image: {time.perf_counter() - t0:.2f} s)")

        print("(c) smoke-suite sizes (r18/FPN64, 128 px images, batch 8, cached), pretrain stage of 160 images:")
        for views, mlp in (((64, 32), (256, 128, 256)), ((96, 48), (256, 128, 256)), ((128, 64), (256, 128, 256))):
            m = SoCo({"view_size": views[0], "small_view_size": views[1], "proj_hidden": mlp[0],
                      "proj_dim": mlp[1], "pred_hidden": mlp[2]})
            c8, _ = _datasets(m, source, tmp)
            trainer = _Trainer(m, det, steps_per_epoch=1)
            trainer.steps(c8, 8)
            sps = statistics.median(sum((trainer.steps(c8, 8) for _ in range(3)), []))
            ips = 8 / sps
            print(f"    views {views[0]:3d}/{views[1]:<3d} MLP {mlp[0]}/{mlp[1]}: {1000 * sps:7.0f} ms/step, "
                  f"{ips:6.1f} images/s -> {160 / ips:5.1f} s per epoch of 160 images")


if __name__ == "__main__":
    main()
