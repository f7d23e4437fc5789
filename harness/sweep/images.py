"""``--check-images decode`` of ``run`` / ``eval`` as Ray tasks over the cluster's CPUs.

A full decode of COCO's train split is ~10 CPU-minutes at 640x480; spread over a cluster it
takes seconds per node, and each image is read on a worker node as a training worker would
read it (a node that cannot see a dataset says so here, before a trial starts).
"""
from __future__ import annotations

import ray

from harness.core import DataError
from harness.data import check_image_files, split_index

#: Images per task: enough work to hide a task's overhead (~2,000 x ~5 ms), small enough to spread.
CHUNK = 2000


@ray.remote(num_cpus=1)
def _decode_chunk(folder: str, annotations: str, images: str, start: int, stop: int) -> dict | None:
    try:
        check_image_files(split_index(folder, annotations, images), level="decode", items=range(start, stop),
                          workers=1)
    except DataError as err:
        node = ray.get_runtime_context().get_node_id()
        return {"message": f"{err.message} (on node {node[:12]})", "file": err.file, "record": err.record,
                "field": err.field}
    return None


def decode_check_on_cluster(splits: list[tuple[str, str, str]], *, progress: bool = False) -> None:
    """Fully decode every image of ``splits`` (index folder, annotation file, image folder) on the
    cluster; the first problem in file order is raised as a :class:`DataError`."""
    from tqdm.auto import tqdm
    refs = []
    for folder, annotations, images in splits:
        n = len(split_index(folder, annotations, images))
        refs += [_decode_chunk.remote(folder, annotations, images, s, min(s + CHUNK, n)) for s in range(0, n, CHUNK)]
    order = {ref: k for k, ref in enumerate(refs)}
    problems, pending = {}, list(refs)
    with tqdm(total=len(refs), desc="decoding every image on the cluster", unit="chunk",
              disable=not progress, leave=False) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            found = ray.get(done[0])
            if found:
                problems[order[done[0]]] = found
            bar.update(1)
    if problems:
        first = problems[min(problems)]
        raise DataError(first["message"], file=first["file"], record=first["record"], field=first["field"])
