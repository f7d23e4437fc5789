"""One stage on one worker, plain PyTorch and no Ray: the training loop, optimiser and lr schedule,
precision, evaluation, and the typed records of a stage's job and state (the benchmarks call it
directly; :mod:`harness.sweep` calls it inside Ray Train)."""
from harness.engine.stage import (FINITE_CHECK_EVERY, NonFiniteLoss, Precision, RepeatedDataset, StageJob, StageState,
                                  autocast_dtype, build_optimizer, evaluate_checkpoint, evaluate_detector,
                                  evaluate_stage, grouped_loader, images_to_device, loader_workers, lr_factor,
                                  parameter_groups, run_stage, seed_everything, train_one_epoch, training_images,
                                  use_deterministic_kernels)

__all__ = ["FINITE_CHECK_EVERY", "NonFiniteLoss", "Precision", "RepeatedDataset", "StageJob", "StageState",
           "autocast_dtype", "build_optimizer", "evaluate_checkpoint", "evaluate_detector", "evaluate_stage",
           "grouped_loader", "images_to_device", "loader_workers", "lr_factor", "parameter_groups", "run_stage",
           "seed_everything", "train_one_epoch", "training_images", "use_deterministic_kernels"]
