"""Batches from DataLoader workers to the training process through reused shared memory.

Why: torch sends every tensor of a batch through a fresh shared-memory segment, and a detection
batch has four per image (image, boxes, labels, ignore boxes). Each segment is page-faulted in
by the worker as it is filled (~1 ms per 1.8 MB here), and its descriptor fetched by the training
process over a new socket connection (~0.3 ms per tensor). At 640x480 that cost as much as
decoding the images, so one loader worker made a 2-core machine's loading *slower* (0.82x).

Here each worker packs a whole batch into one of a few shared buffers it keeps
(:class:`PackingCollate`); the training process copies the batch out (into pinned memory
when the loader pins) and hands the buffer back. A buffer's descriptor crosses once, when the
worker makes or grows it. Who may write a buffer is decided by a lease in a shared array taken
under its lock: a worker writes only into a buffer whose lease is free, and the training process
frees exactly the lease of the batch it copied out (a batch it drops unread frees its lease too),
so a late hand-back from a replaced worker cannot free a buffer a new one is filling.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import threading
import uuid
import weakref
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, get_worker_info

_ALIGN = 64     # bytes: every tensor of a packed buffer starts at a multiple (any dtype's alignment)
_GROWTH = 1.25  # a buffer made or grown for a batch holds this much more, for the next larger one

#: PackingCollate objects of this process by id: a received batch finds its pool to hand its buffer back.
_POOLS: weakref.WeakValueDictionary[str, PackingCollate] = weakref.WeakValueDictionary()


@dataclass(frozen=True)
class _Slot:
    """Where one tensor of a batch lies in its buffer: ``shape`` in memory order, and the
    permutation back to the tensor's own order (a decoded image is HWC in memory and CHW
    as a tensor; copying it as it lies is a memcpy, reordering it cost 1 ms per image)."""
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]
    order: tuple[int, ...] | None = None  # the tensor is view(shape).permute(order); None: as stored

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.dtype.itemsize


def _map_tensors(obj, fn):
    """``obj`` (lists, tuples, named tuples, dicts of tensors and plain values) with ``fn`` applied to
    each tensor or :class:`_Slot`."""
    if isinstance(obj, (torch.Tensor, _Slot)):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        mapped = [_map_tensors(v, fn) for v in obj]
        return type(obj)(*mapped) if hasattr(obj, "_fields") else type(obj)(mapped)
    return obj


def _layout(batch) -> tuple[list[torch.Tensor], object, int]:
    """The batch's tensors, the batch with a :class:`_Slot` for each, and the bytes they need."""
    tensors, size = [], 0

    def place(t: torch.Tensor) -> _Slot:
        nonlocal size
        memory_order = sorted(range(t.dim()), key=lambda d: -t.stride(d))
        stored = t.permute(memory_order)
        if t.is_contiguous() or not stored.is_contiguous():
            slot = _Slot(size, t.dtype, tuple(t.shape))
        else:
            slot = _Slot(size, t.dtype, tuple(stored.shape), tuple(memory_order.index(d) for d in range(t.dim())))
        tensors.append(t)
        size += -(-slot.nbytes // _ALIGN) * _ALIGN
        return slot
    layout = _map_tensors(batch, place)
    return tensors, layout, max(size, 1)


def _view(buffer: torch.Tensor, s: _Slot) -> torch.Tensor:
    stored = buffer[s.offset:s.offset + s.nbytes].view(s.dtype).view(s.shape)
    return stored if s.order is None else stored.permute(s.order)


def _shared_bytes(n: int) -> torch.Tensor:
    """``n`` bytes of shared memory as a uint8 tensor (as torch's own collate allocates in workers)."""
    return torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(n))


class PackedBatch:
    """A batch on its way from a loader worker: its tensors in one buffer, its structure in ``layout``.

    ``buffer`` travels only when the worker made it for this batch (``slot`` None: used once;
    else a new or grown buffer of that slot); otherwise the receiver already holds the worker's
    buffer of ``slot`` = (worker id, slot, worker pid, generation).
    """

    def __init__(self, pool_id: str, layout, nbytes: int, buffer: torch.Tensor | None,
                 slot: tuple[int, int, int, int] | None, lease: int):
        self.pool_id, self.layout, self.nbytes = pool_id, layout, nbytes
        self.buffer, self.slot, self.lease = buffer, slot, lease
        self._leased = False  # True in the receiving process until the buffer is handed back

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_leased"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._leased = self.slot is not None
        pool = _POOLS.get(self.pool_id)
        if pool is not None and self.slot is not None and self.buffer is not None:
            pool.hold(self.slot, self.buffer)  # on arrival: later batches in it may come without it

    def release(self) -> None:
        """Hand the worker's buffer back (once; only in the process that received the batch)."""
        if self._leased:
            self._leased = False
            pool = _POOLS.get(self.pool_id)
            if pool is not None:
                pool.release(self.slot[0], self.slot[1], self.lease)

    def __del__(self):  # a batch dropped unread (an epoch left early) frees its buffer too
        self.release()


class PackingCollate:
    """A DataLoader ``collate_fn`` whose workers send :class:`PackedBatch` es in ``slots`` reused
    buffers each; :meth:`receive` (in the training process) gives back ``collate``'s batch.

    ``slots``: buffers per worker, at least the batches a worker has ahead (the DataLoader's
    ``prefetch_factor``) plus the one being filled; when all of a worker's buffers are still
    out, it sends the batch in a buffer used once (torch's usual cost, never a wait).
    """

    def __init__(self, collate, num_workers: int, slots: int, *, pin_memory: bool = False, context=None):
        self.collate, self.slots, self.pin_memory = collate, slots, pin_memory
        self.id = uuid.uuid4().hex
        context = mp.get_context(context) if context is None or isinstance(context, str) else context
        self.leases = context.Array("q", num_workers * slots)  # 0: free, else the lease of the batch in it
        self._reset_process_state()
        _POOLS[self.id] = self

    def _reset_process_state(self) -> None:
        self._pid = None     # the worker process whose buffers _own holds
        self._own = {}       # in a worker: slot -> (generation, buffer)
        self._leases_made = 0
        self._received = {}  # in the training process: (worker, slot) -> (pid, generation, buffer)

    def __getstate__(self) -> dict:  # into a spawned worker: the shared leases, not the buffers
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._reset_process_state()

    # --- in a loader worker -------------------------------------------------------------------
    def __call__(self, samples):
        batch = self.collate(samples)
        info = get_worker_info()
        if info is None:
            return batch
        tensors, layout, nbytes = _layout(batch)
        worker, pid = info.id, os.getpid()
        if self._pid != pid:  # a new worker process: the leases its predecessor left are void
            self._pid, self._own, self._leases_made = pid, {}, 0
            with self.leases.get_lock():
                for k in range(self.slots):
                    self.leases[worker * self.slots + k] = 0
        k, lease = self._acquire(worker, nbytes)
        if k is None:
            buffer = sent = _shared_bytes(nbytes)
            slot = None
        else:
            generation, buffer = self._own.get(k, (0, None))
            sent = None
            if buffer is None or buffer.numel() < nbytes:
                generation, buffer = generation + 1, _shared_bytes(int(nbytes * _GROWTH))
                self._own[k] = (generation, buffer)
                sent = buffer
            slot = (worker, k, pid, generation)
        for t, s in zip(tensors, _slots(layout)):
            _view(buffer, s).copy_(t)
        return PackedBatch(self.id, layout, nbytes, sent, slot, lease)

    def _acquire(self, worker: int, nbytes: int) -> tuple[int | None, int]:
        """A free buffer of this worker (one big enough if any), leased; ``(None, 0)`` if none is free."""
        base = worker * self.slots
        with self.leases.get_lock():
            free = [k for k in range(self.slots) if self.leases[base + k] == 0]
            if not free:
                return None, 0
            fits = [k for k in free if k in self._own and self._own[k][1].numel() >= nbytes]
            k = (fits or free)[0]
            self._leases_made += 1
            lease = (self._pid << 24) | (self._leases_made & 0xFFFFFF)
            self.leases[base + k] = lease
        return k, lease

    # --- in the training process ----------------------------------------------------------------
    def release(self, worker: int, k: int, lease: int) -> None:
        with self.leases.get_lock():
            if self.leases[worker * self.slots + k] == lease:
                self.leases[worker * self.slots + k] = 0

    def hold(self, slot: tuple[int, int, int, int], buffer: torch.Tensor) -> None:
        """Keep a worker's new or grown buffer (it is sent once, with the first batch in it)."""
        worker, k, pid, generation = slot
        self._received[(worker, k)] = (pid, generation, buffer)

    def receive(self, packed):
        """The batch of ``packed``, its tensors views of one buffer of this process (pinned when
        ``pin_memory``); the worker's buffer is handed back."""
        if not isinstance(packed, PackedBatch):
            return packed
        if packed.slot is None:  # a buffer used once: the batch keeps it
            buffer = packed.buffer.pin_memory() if self.pin_memory else packed.buffer
        else:
            worker, k, pid, generation = packed.slot
            held = self._received.get((worker, k))
            if held is None or held[:2] != (pid, generation):
                raise RuntimeError(f"loader worker {worker} (pid {pid}) sent a batch in buffer {k} "
                                   f"generation {generation}, which this process never received")
            buffer = torch.empty(packed.nbytes, dtype=torch.uint8, pin_memory=self.pin_memory)
            buffer.copy_(held[2][:packed.nbytes])
            packed.release()
        return _map_tensors(packed.layout, lambda s: _view(buffer, s))


def _slots(layout) -> list[_Slot]:
    out: list[_Slot] = []
    _map_tensors(layout, out.append)
    return out


class DetectionLoader(DataLoader):
    """A DataLoader whose batches are what its ``collate_fn`` made, whether its workers send them
    packed (:class:`PackingCollate`) or not.

    With workers, the batches are received (unpickled, copied out of the workers' buffers,
    pinned) by a thread, ``prefetch`` batches ahead, as torch's pin-memory thread does: the
    training thread only takes ready batches (~1 ms per 1.8 MB batch less on it here).
    """

    def __init__(self, dataset, *, collate_fn, num_workers: int = 0, pin_memory: bool = False,
                 prefetch_factor: int | None = None, multiprocessing_context=None, **kwargs):
        if num_workers > 0:  # pinned as the receiving thread copies batches out, not by torch's thread
            collate_fn = PackingCollate(collate_fn, num_workers, (prefetch_factor or 2) + 1, pin_memory=pin_memory,
                                        context=multiprocessing_context)
            pin_memory = False
        super().__init__(dataset, collate_fn=collate_fn, num_workers=num_workers, pin_memory=pin_memory,
                         prefetch_factor=prefetch_factor, multiprocessing_context=multiprocessing_context, **kwargs)
        self._receiving: _ReceivingIterator | None = None

    def __iter__(self):
        if self._receiving is not None:  # the previous pass, left early, lets go of the workers' iterator
            self._receiving.close()
            self._receiving = None
        batches = super().__iter__()
        if not isinstance(self.collate_fn, PackingCollate):
            return batches
        self._receiving = _ReceivingIterator(batches, self.collate_fn.receive, self.prefetch_factor or 2)
        return self._receiving


_END = object()


class _ReceivingIterator:
    """Batches of ``source`` passed through ``receive`` on a thread, at most ``depth`` ahead; an
    exception of ``source`` (a worker's, with its file named) is raised by ``__next__``. The
    thread holds no reference to this object: when the loader is dropped mid-epoch (a stage
    that failed), the thread stops and lets the workers go."""

    def __init__(self, source, receive, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self._thread = threading.Thread(target=_receive_into, args=(source, receive, self._queue, self._stop, device),
                                        daemon=True, name="detbench-loader-receive")
        self._thread.start()

    def __iter__(self):
        return self

    def __next__(self):
        batch, error = self._queue.get()
        if error is not None:
            self._stop.set()
            raise error
        if batch is _END:
            self._stop.set()
            raise StopIteration
        return batch

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass

    def __del__(self):
        self._stop.set()


def _receive_into(source, receive, out: queue.Queue, stop: threading.Event, device) -> None:
    def put(item) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    if device is not None:  # pinned buffers without a CUDA context on device 0 (as torch's pin thread)
        torch.cuda.set_device(device)
    try:
        for packed in source:
            if not put((receive(packed), None)):
                return
    except BaseException as e:  # noqa: BLE001  handed to the training thread, raised there
        put((None, e))
        return
    put((_END, None))
