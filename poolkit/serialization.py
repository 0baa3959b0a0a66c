"""How jobs and results are turned into bytes.

Jobs must accept lambdas, closures and functions defined in ``__main__``, which
plain ``pickle`` refuses or pickles by a reference the worker cannot
resolve. ``cloudpickle`` handles them, but pickling everything with it costs
about ten times more than ``pickle`` for an ordinary module-level function.
So poolkit pickles with the C pickler and hands only the objects that need it
(functions and classes that cannot be found again by module and name) to
cloudpickle, through ``reducer_override``. The result is plain pickle data that
``pickle.loads`` reads back.
"""

from __future__ import annotations

import pickle
import sys
import threading
import traceback
import types
from typing import Any

import cloudpickle

from .errors import RemoteTraceback, UnpicklableJobError

__all__ = ["PROTOCOL", "attach_remote_traceback", "dumps", "dumps_error", "dumps_parts", "format_exception", "loads"]

PROTOCOL = 5

loads = pickle.loads


def _importable(obj: Any) -> bool:
    """True if ``pickle`` can find ``obj`` again by its module and qualified name."""
    module_name = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if module_name is None or qualname is None or module_name == "__main__":
        return False
    if "<locals>" in qualname or "<lambda>" in qualname:
        return False
    module = sys.modules.get(module_name)
    if module is None:
        return False
    found: Any = module
    for part in qualname.split("."):
        found = getattr(found, part, None)
        if found is None:
            return False
    return found is obj


_importable_functions: set[Any] = set()  # module-level functions seen importable (they live forever anyway)


MainRefs = dict[str, Any]
_NO_MAIN_REFS: MainRefs = {}
# What this process's own __main__ shares with its peer (set in fork-mode workers).
process_main_refs: MainRefs = {}


class _DupFd:
    """A descriptor in a pickle for a new process: the same number there (see dumps_for_new_process)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def detach(self) -> int:
        return self.fd


class _NewProcess:
    """Stands in for multiprocessing's spawning ``Popen`` while a pickle for a new process is made.

    multiprocessing lets its queues, locks, pipes and manager proxies be
    pickled only "for a new process" (``assert_spawning``): their
    descriptors are then listed here, to be passed to that process at the
    same numbers, and proxies carry the authkey.
    """

    DupFd = _DupFd

    def __init__(self) -> None:
        self.fds: list[int] = []

    def duplicate_for_child(self, fd: int) -> int:
        self.fds.append(fd)
        return fd


def dumps_for_new_process(obj: Any, main_refs: MainRefs) -> tuple[bytes, list[int]]:
    """Pickle ``obj`` for a process started from a fresh interpreter; return the descriptors it needs."""
    import copyreg
    from multiprocessing import context, reduction

    new_process = _NewProcess()
    collector = _Collector()
    pickler = _JobPickler(collector, protocol=PROTOCOL)
    pickler.main_refs = main_refs
    # multiprocessing's own reducers (connections, sockets): by descriptor.
    extra = getattr(reduction.ForkingPickler, "_extra_reducers", {})
    pickler.dispatch_table = {**copyreg.dispatch_table, **extra}
    context.set_spawning_popen(new_process)  # type: ignore[arg-type]  # duck-typed, as multiprocessing uses it
    try:
        pickler.dump(obj)
    finally:
        context.set_spawning_popen(None)
    return collector.take(), new_process.fds


def snapshot_main() -> MainRefs:
    """The functions and classes defined at the top level of ``__main__`` right now.

    A process forked after this moment has the very same objects in its own
    ``__main__``, so they can travel by reference (``__main__.name``) instead
    of by value: cheaper, and they keep sharing that module's globals, which
    is what the stdlib idiom "the initializer sets a global, jobs read it"
    relies on.
    """
    main = sys.modules.get("__main__")
    if main is None:
        return {}
    refs: MainRefs = {}
    for name, value in list(vars(main).items()):
        if (
            isinstance(value, (types.FunctionType, type))
            and getattr(value, "__module__", None) == "__main__"
            and getattr(value, "__qualname__", None) == name
        ):
            refs[name] = value
    return refs


def load_main_function(data: bytes) -> types.FunctionType:
    """Load a function of the caller's ``__main__`` that travelled by value, as a function of this ``__main__``.

    cloudpickle gives a function it pickles by value a globals dict of its
    own, one per pickle: an initializer that sets a global and a job that
    reads it (the standard library's idiom) would each see a different
    dict, and the job the old value. Rebuilt over this process's own
    ``__main__`` namespace, every such function shares one, as functions of
    one module do. The globals it brought along are added only where this
    process has none, so a value an initializer set is never overwritten by
    the caller's copy.
    """
    func = cloudpickle.loads(data)
    namespace = sys.modules["__main__"].__dict__
    for name, value in func.__globals__.items():
        if name not in namespace:
            namespace[name] = value
    rebuilt = types.FunctionType(
        func.__code__, namespace, func.__name__, func.__defaults__, func.__closure__
    )
    rebuilt.__kwdefaults__ = func.__kwdefaults__
    rebuilt.__qualname__ = func.__qualname__
    rebuilt.__doc__ = func.__doc__
    rebuilt.__annotations__ = func.__annotations__
    rebuilt.__dict__.update(func.__dict__)
    rebuilt.__module__ = "__main__"
    return rebuilt


class _JobPickler(pickle.Pickler):
    main_refs: MainRefs = _NO_MAIN_REFS

    def reducer_override(self, obj: Any) -> Any:
        if obj.__class__ is types.FunctionType and obj in _importable_functions:
            return NotImplemented
        if isinstance(obj, (types.FunctionType, type)):
            if getattr(obj, "__module__", None) == "__main__":
                if self.main_refs.get(obj.__qualname__) is obj:
                    return NotImplemented  # the other side's __main__ has this very object
                if obj.__class__ is types.FunctionType:
                    return load_main_function, (cloudpickle.dumps(obj, protocol=PROTOCOL),)
                return cloudpickle.loads, (cloudpickle.dumps(obj, protocol=PROTOCOL),)
            if not _importable(obj):
                return cloudpickle.loads, (cloudpickle.dumps(obj, protocol=PROTOCOL),)
            if obj.__class__ is types.FunctionType:
                _importable_functions.add(obj)
        elif obj.__class__ is memoryview:
            return _reduce_memoryview(obj)
        elif isinstance(obj, BaseException):
            # The exception's own reduction, never a process-wide copyreg entry:
            # some libraries (tblib, installed by dask distributed) register one
            # that loses attributes set by __init__, such as SystemExit.code.
            return obj.__reduce__()
        return NotImplemented


def _reduce_memoryview(view: memoryview) -> Any:
    """A memoryview travels as its bytes (out of band when large, see shm.py) and is rebuilt with its format and shape."""
    data: Any = pickle.PickleBuffer(view) if view.contiguous else view.tobytes()
    return _rebuild_memoryview, (data, view.format, view.shape)


def _rebuild_memoryview(data: Any, format: str, shape: tuple[int, ...]) -> Any:
    view: Any = memoryview(data).cast("B")
    return view.cast(format, shape) if shape else view.cast(format)


class _Collector:
    """The pickler's file: keeps the pieces it is given instead of copying them.

    The C pickler hands a large ``bytes`` object to ``write`` as it is, so a
    10 MiB payload is copied once (by the final join), not at every growth of
    a buffer: this is what makes large payloads several times cheaper.
    """

    __slots__ = ("parts", "write")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        # The pickler looks ``write`` up once, at its creation: a C-level
        # list.append keeps the per-dump cost of this file near zero.
        self.write = self.parts.append

    def take(self) -> bytes:
        parts = self.parts
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        return data


class _Dumper:
    """A reusable pickler and its collector: building a Pickler costs more than a small dump."""

    __slots__ = ("buffers", "busy", "collector", "parts", "pickler", "threshold")

    def __init__(self, out_of_band: bool = False) -> None:
        self.collector = _Collector()
        self.parts = self.collector.parts
        self.buffers: list[pickle.PickleBuffer] = []
        self.threshold = 0
        callback = self._take_buffer if out_of_band else None
        self.pickler = _JobPickler(self.collector, protocol=PROTOCOL, buffer_callback=callback)
        self.busy = False

    def _take_buffer(self, buffer: pickle.PickleBuffer) -> bool:
        """pickle's buffer_callback: keep a large buffer out of band (False), a small one in the stream."""
        if memoryview(buffer).nbytes < self.threshold:
            return True
        self.buffers.append(buffer)
        return False


_local = threading.local()


def _fresh_dumper() -> _Dumper:
    dumper = _Dumper()
    _local.dumper = dumper
    return dumper


def dumps(obj: Any, main_refs: MainRefs | None = None) -> bytes:
    """Pickle ``obj`` so that a worker (or the parent) can load it with ``pickle.loads``.

    ``main_refs`` names the ``__main__`` objects the receiving process shares
    with this one (see ``snapshot_main``); by default, those of this process.
    """
    refs = process_main_refs if main_refs is None else main_refs
    state: _Dumper = getattr(_local, "dumper", None) or _fresh_dumper()
    if state.busy:  # re-entered (an object's __reduce__ pickles something itself)
        collector = _Collector()
        pickler = _JobPickler(collector, protocol=PROTOCOL)
        pickler.main_refs = refs
        pickler.dump(obj)
        return collector.take()
    state.busy = True
    pickler = state.pickler
    parts = state.parts
    try:
        pickler.main_refs = refs
        pickler.dump(obj)
        return parts[0] if len(parts) == 1 else b"".join(parts)
    finally:
        parts.clear()
        pickler.clear_memo()
        state.busy = False


def dumps_parts(
    obj: Any, main_refs: MainRefs | None, threshold: int
) -> tuple[list[Any], list[pickle.PickleBuffer]]:
    """Pickle ``obj`` as ``dumps`` does, but return the stream's pieces as the pickler wrote them, unjoined,
    and the buffers of at least ``threshold`` bytes that pickle kept out of band (see shm.py).

    The C pickler writes a large ``bytes`` (or ``bytearray``, or in-band
    buffer) as a piece of its own, the object itself, so nothing is copied yet.
    """
    refs = process_main_refs if main_refs is None else main_refs
    state: _Dumper | None = getattr(_local, "buffer_dumper", None)
    if state is None:
        state = _local.buffer_dumper = _Dumper(out_of_band=True)
    if state.busy:  # re-entered: a dumper of its own
        state = _Dumper(out_of_band=True)
    state.busy = True
    pickler = state.pickler
    try:
        state.threshold = threshold
        pickler.main_refs = refs
        pickler.dump(obj)
        return list(state.parts), list(state.buffers)
    finally:
        state.parts.clear()
        state.buffers.clear()
        pickler.clear_memo()
        state.busy = False


def format_exception(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def dumps_error(exc: BaseException) -> bytes:
    """Pickle ``(exception, traceback text)`` so that it is sure to load again in the pool's process.

    The one rule for a job's exception that cannot make the trip: one that
    will not pickle, and one whose pickle will not load (its ``__init__``
    wants arguments its ``args`` do not hold, so unpickling calls it wrong),
    are both replaced by [`UnpicklableJobError`][poolkit.UnpicklableJobError], which keeps
    the original's type name, message and traceback text. The load is tried
    here, in the worker, because only here are the type and message still known.
    """
    tb = format_exception(exc)
    step = "pickled"
    try:
        data = dumps((exc, tb))
        step = "unpickled"
        pickle.loads(data)
        return data
    except BaseException as failure:  # SystemExit from a hostile __reduce__ or __init__ too
        why = f"{type(failure).__name__}: {failure}"
    cls = type(exc)
    type_name = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    try:
        message = str(exc)
    except BaseException as str_failure:
        message = f"<str() failed: {type(str_failure).__name__}>"
    stand_in = UnpicklableJobError(
        f"{type_name}: {message} (the job's exception could not be {step}: {why})",
        type_name=type_name,
        original_message=message,
        traceback=tb,
    )
    return dumps((stand_in, tb))


def attach_remote_traceback(exc: BaseException, tb_text: str) -> BaseException:
    """Chain the worker's traceback to ``exc`` as its ``__cause__``, as the stdlib does."""
    exc.__cause__ = RemoteTraceback(f'\n"""\n{tb_text}"""')
    return exc
