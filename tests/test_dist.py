"""Data-parallel training: buckets, shards and NCCL's bootstrap in one process; train.py under `mpiexec -n 2`."""

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tinypalm import Config, PaLM, checkpoint, dist
from tinypalm.flat import Layout
from tinypalm.model import layer_storage_names, storage_shapes
from tinypalm.optim import AdamW, Stretch, update_runs
from test_cli import assert_user_error

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "train.py")
MPIEXEC = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
HAVE_MPI = MPIEXEC is not None and importlib.util.find_spec("mpi4py") is not None
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason="needs mpi4py and mpiexec, which the test extra installs "
                                                    "(pip install -e '.[test]')")
ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}    # 2 ranks on 2 cores: one thread each
TINY = ["--preset", "tiny", "--batch-size", "3", "--seq-len", "16", "--eval-every", "3", "--eval-steps", "3",
        "--log-every", "1", "--sample-tokens", "0", "--dtype", "float64", "--dropout", "0.1", "--warmup-steps", "2",
        "--decay-steps", "6"]


# --- in one process -----------------------------------------------------------------------------------------------

def tiny_model():
    return PaLM(Config.preset("tiny"), dtype="float64", seed=0)


@pytest.mark.parametrize("bucket_bytes", [1, 20_000, 10**12])
def test_buckets_cover_the_gradient_in_the_order_the_backward_finishes_it(bucket_bytes):
    model = tiny_model()
    layout, n_layers = model.params.layout, model.config.n_layers
    buckets = dist.plan_buckets(layout, n_layers, bucket_bytes, itemsize=8)
    assert buckets[0][1] == layout.size and buckets[-1][0] == 0 and buckets[-1][2] is None
    for (a, _, ready), (_, b, next_ready) in zip(buckets, buckets[1:]):
        assert b == a                                          # contiguous, from the end of the vector down
        assert next_ready is None or next_ready < ready        # later buckets wait for lower layers
    for a, b, ready in buckets:
        if ready is not None:                                  # everything in it is written by layers >= ready
            assert a == layout.spans[layer_storage_names(ready)[0]][0] and (b - a) * 8 >= bucket_bytes
    assert len(buckets) == {1: n_layers + 1, 10**12: 1}.get(bucket_bytes, len(buckets))
    assert layout.spans["embed"][0] == 0 and buckets[-1][1] >= layout.spans["embed"][1]


def test_sharded_adamw_updates_exactly_like_the_whole_one():
    model = tiny_model()
    params, layout = model.params, model.params.layout
    frozen = ["embed", *layer_storage_names(0)[:1]]
    rng = np.random.default_rng(0)
    whole = AdamW(params, frozen=frozen)
    sharded_params = params.flat.copy()
    shards = dist.shard_bounds(layout.size, 7)          # 135360 parameters: shards of uneven length
    parts = [AdamW(params, frozen=frozen, shard=s) for s in shards]
    assert sum(len(p.m.flat) for p in parts) == layout.size
    for a, b in shards:                                   # the runs inside a shard are the whole runs cut to it
        cut = [(max(x, a) - a, min(y, b) - a, d) for x, y, d in update_runs(layout, frozen) if x < b and y > a]
        assert update_runs(layout, frozen, shard=(a, b)) == cut
    for step in range(3):
        grads = model.grads_like()
        grads.flat[...] = rng.standard_normal(layout.size)
        for part, (a, b) in zip(parts, shards):
            part.step(Stretch(sharded_params[a:b]), Stretch(grads.flat[a:b]), lr=1e-2)
        whole.step(params, grads, lr=1e-2)
    np.testing.assert_array_equal(sharded_params, params.flat)
    np.testing.assert_array_equal(np.concatenate([p.m.flat for p in parts]), whole.m.flat)
    np.testing.assert_array_equal(np.concatenate([p.v.flat for p in parts]), whole.v.flat)


def test_plan_report_counts_the_gradient_bytes_and_splits_the_optimizer_state():
    cfg = Config.preset("palm-8b")
    n = Layout(storage_shapes(cfg)).size                     # every parameter, norms included
    lines = dist.plan_report(cfg, 64, "float32", bandwidth_gbs=50)
    text = "\n".join(lines)
    assert f"{n * 4 / 1e9:,.1f} GB of gradients" in text                               # float32 gradients
    assert f"{2 * 63 / 64 * n * 4 / 1e9:,.1f} GB per rank" in text                      # ring: 2(N-1)/N of them
    assert f"{2 * 63 / 64 * n * 4 / 50e9 * 1e3:,.2f} ms per step" in text
    without, zero = lines[-2].split(), lines[-1].split()
    assert without[:3] == ["without", "ZeRO", f"{n * 4 / 1e9:,.1f}"] and without[6:8] == [f"{8 * n / 1e9:,.1f}", "GB"]
    assert zero[:2] == ["ZeRO-1", f"{n * 4 / 1e9:,.1f}"] and zero[5:7] == [f"{8 * n / 64 / 1e6:,.1f}", "MB"]


class FakeNccl:
    """Records the calls a rank makes to NCCL while it builds its communicator."""

    def __init__(self, uid):
        self.uid, self.calls = uid, []

    def get_unique_id(self):
        self.calls.append("get_unique_id")
        return self.uid

    def NcclCommunicator(self, size, uid, rank):
        self.calls.append(("NcclCommunicator", size, uid, rank))
        return "communicator"


class FakeMPIComm:
    def __init__(self, rank, size, root_sends):
        self.rank, self.size, self.root_sends, self.sent = rank, size, root_sends, []

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def bcast(self, obj, root=0):
        self.sent.append(obj)
        return obj if self.rank == root else self.root_sends


def test_nccl_unique_id_is_made_by_rank_0_and_broadcast_before_any_rank_joins():
    uid = b"\x07" * 128
    root_nccl, root_comm = FakeNccl(uid), FakeMPIComm(0, 2, None)
    assert dist.nccl_communicator(root_comm, root_nccl) == "communicator"
    assert root_nccl.calls == ["get_unique_id", ("NcclCommunicator", 2, uid, 0)] and root_comm.sent == [uid]
    other_nccl, other_comm = FakeNccl(b"\x00" * 128), FakeMPIComm(1, 2, uid)
    dist.nccl_communicator(other_comm, other_nccl)
    assert other_nccl.calls == [("NcclCommunicator", 2, uid, 1)]       # never its own id: rank 0's


def test_one_process_imports_neither_mpi4py_nor_nccl(tmp_path, corpus):
    code = textwrap.dedent(f"""
        import runpy, sys
        sys.argv = [{TRAIN!r}, "--data", {str(corpus)!r}, *{TINY!r}, "--max-steps", "2"]
        runpy.run_path(sys.argv[0], run_name="__main__")
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("mpi4py", "cupy", "cupy_backends")))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"


# --- under mpiexec ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    rng = np.random.default_rng(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "big", "red", "house"]
    path.write_text("\n".join(" ".join(rng.choice(words, 12)) + "." for _ in range(600)))
    return path


def train(*args, ranks=1, cwd, check=True, mpmd=None):
    """train.py alone (ranks=1) or under `mpiexec -n ranks`; mpmd: a list of per-rank commands instead."""
    if mpmd is not None:
        cmd = [MPIEXEC]
        for i, rank_cmd in enumerate(mpmd):
            cmd += ([":"] if i else []) + ["-n", "1", *rank_cmd]
    elif ranks == 1:
        cmd = [sys.executable, TRAIN, *args]
    else:
        cmd = [MPIEXEC, "-n", str(ranks), sys.executable, TRAIN, *args]
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, env=ENV)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def assert_one_error_line(result, status, *words):
    assert result.returncode == status, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for w in words:
        assert w in lines[0], (w, lines[0])


def load(path):
    ck = checkpoint.load(str(path), optimizer=True)
    return ck, {**{f"param.{k}": v for k, v in ck.params.items()}, **{f"opt.{k}": v for k, v in ck.opt_state.items()}}


def assert_close(got, want, rtol=1e-12):
    """Every array of two checkpoints within rtol of the largest entry of the array."""
    (ck_got, got), (ck_want, want) = load(got), load(want)
    assert ck_got.step == ck_want.step and sorted(got) == sorted(want)
    for key in want:
        scale = max(np.abs(want[key]).max(), np.finfo(np.float64).tiny)
        assert np.abs(got[key] - want[key]).max() <= rtol * scale, key


@pytest.fixture(scope="module")
def runs(corpus, tmp_path_factory):
    """One process with grad accum 2, and two ranks with and without ZeRO-1: 6 steps each, same global batch."""
    if not HAVE_MPI:
        pytest.skip("needs mpi4py and mpiexec, which the test extra installs (pip install -e '.[test]')")
    d = tmp_path_factory.mktemp("runs")
    common = ["--data", str(corpus), *TINY]
    train(*common, "--max-steps", "6", "--grad-accum", "2", "--out", "single", cwd=d)
    train(*common, "--max-steps", "6", "--out", "ranks", ranks=2, cwd=d)
    train(*common, "--max-steps", "6", "--zero", "1", "--out", "zero", ranks=2, cwd=d)
    return d


@needs_mpi
@pytest.mark.parametrize("run", ["ranks", "zero"])
def test_two_ranks_equal_one_process_with_twice_the_grad_accum(runs, run):
    assert_close(runs / run / "last.npz", runs / "single" / "last.npz")
    assert_close(runs / run / "best.npz", runs / "single" / "best.npz")
    lines = (runs / run / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len((runs / "single" / "metrics.jsonl").read_text().splitlines())   # rank 0 alone logs


@needs_mpi
def test_seven_ranks_with_shards_of_uneven_length(corpus, tmp_path):
    common = ["--data", str(corpus), *TINY, "--batch-size", "1", "--max-steps", "2", "--eval-every", "2"]
    assert PaLM(Config.preset("tiny")).params.layout.size % 7 != 0
    train(*common, "--grad-accum", "7", "--out", "single", cwd=tmp_path)
    train(*common, "--zero", "1", "--out", "zero", ranks=7, cwd=tmp_path)
    assert_close(tmp_path / "zero" / "last.npz", tmp_path / "single" / "last.npz")


@needs_mpi
def test_resume_under_mpi_is_exact_and_a_two_rank_checkpoint_resumes_on_one(runs, corpus, tmp_path):
    train("--data", str(corpus), *TINY, "--max-steps", "3", "--zero", "1", "--out", "a", ranks=2, cwd=tmp_path)
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    train("--resume", "--out", "a", "--max-steps", "6", ranks=2, cwd=tmp_path)
    _, resumed = load(tmp_path / "a" / "last.npz")
    _, straight = load(runs / "zero" / "last.npz")
    assert sorted(resumed) == sorted(straight)
    for key in straight:
        np.testing.assert_array_equal(resumed[key], straight[key], err_msg=key)
    one = train("--resume", "--out", "b", "--max-steps", "6", "--grad-accum", "2", "--zero", "0", cwd=tmp_path)
    assert "the global batch changes" not in one.stdout       # 1 rank x 2 micro-batches = the saved 2 ranks x 1
    assert_close(tmp_path / "b" / "last.npz", runs / "single" / "last.npz")


def load_adapter_file(path):
    with np.load(path, allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files if k != "meta"}


@needs_mpi
def test_lora_on_two_ranks_equals_one_process_and_resumes(runs, corpus, tmp_path):
    # the adapters' gradients all-reduced (and with ZeRO-1 their moments split): as one process with twice the
    # grad accum, to rounding; a two-rank LoRA run resumed on two ranks lands on the same adapters
    lora = ["--data", str(corpus), *TINY, "--init-from", str(runs / "single" / "last.npz"), "--lora-rank", "2",
            "--lora-targets", "wq,wv,w_down", "--lr", "1e-2"]
    train(*lora, "--max-steps", "6", "--grad-accum", "2", "--out", "single", cwd=tmp_path)
    train(*lora, "--max-steps", "6", "--out", "ranks", ranks=2, cwd=tmp_path)
    train(*lora, "--max-steps", "3", "--zero", "1", "--out", "zero", ranks=2, cwd=tmp_path)
    train("--resume", "--out", "zero", "--max-steps", "6", ranks=2, cwd=tmp_path)
    want = load_adapter_file(tmp_path / "single" / "adapter_last.npz")
    assert any(k.startswith("opt.m.") for k in want) and np.abs(want["lora.layers.0.wq.B"]).max() > 0
    for run in ("ranks", "zero"):
        got = load_adapter_file(tmp_path / run / "adapter_last.npz")
        assert sorted(got) == sorted(want), run
        for key in want:
            scale = max(np.abs(want[key]).max(), np.finfo(np.float64).tiny)
            assert np.abs(got[key] - want[key]).max() <= 1e-12 * scale, (run, key)


FAIL_ON_THIRD_BACKWARD = """
import runpy, sys
from tinypalm.model import PaLM
calls, original = [0], PaLM.loss_and_grads
def failing(self, *args, **kwargs):
    calls[0] += 1
    if calls[0] == 3:
        raise MemoryError("cannot allocate the activations")
    return original(self, *args, **kwargs)
PaLM.loss_and_grads = failing
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@needs_mpi
@pytest.mark.parametrize("failing_rank", [0, 1])
def test_a_failing_rank_ends_every_rank_with_one_line(corpus, tmp_path, failing_rank):
    (tmp_path / "fail.py").write_text(FAIL_ON_THIRD_BACKWARD)
    args = ["--data", str(corpus), *TINY, "--max-steps", "100"]
    healthy, failing = [sys.executable, TRAIN, *args], [sys.executable, "fail.py", TRAIN, *args]
    result = train(mpmd=[failing, healthy] if failing_rank == 0 else [healthy, failing], cwd=tmp_path, check=False)
    words = ["MemoryError", "cannot allocate the activations"] + (["rank 1:"] if failing_rank else [])
    assert_one_error_line(result, 1, *words)
    assert "step 2/100" in result.stdout and "step 3/100" not in result.stdout


@needs_mpi
def test_mismatched_arguments_and_bad_flags_end_the_run_with_one_line(corpus, tmp_path):
    args = [TRAIN, "--data", str(corpus), *TINY, "--max-steps", "2"]
    result = train(mpmd=[[sys.executable, *args], [sys.executable, *args, "--lr", "1e-3"]], cwd=tmp_path, check=False)
    assert_one_error_line(result, 2, "different arguments", "rank 1:", "--lr 1e-3", "same command")
    result = train(*args[1:], "--batch-size", "0", ranks=2, cwd=tmp_path, check=False)
    assert_one_error_line(result, 2, "--batch-size must be at least 1")
    assert "rank" not in result.stderr                       # every rank met it: rank 0 alone reports it


@needs_mpi
def test_ranks_that_read_different_data_end_the_run_with_one_line(tmp_path):
    for rank, words in enumerate([["the", "cat", "sat"], ["a", "dog", "ran"]]):
        (tmp_path / str(rank)).mkdir()
        (tmp_path / str(rank) / "text.txt").write_text("\n".join(" ".join(words * 4) for _ in range(200)))
    cmd = [sys.executable, TRAIN, "--data", "text.txt", *TINY, "--max-steps", "2"]
    result = train(mpmd=[["-wdir", str(tmp_path / str(rank)), *cmd] for rank in range(2)], cwd=tmp_path, check=False)
    assert_one_error_line(result, 2, "the data", "differs between rank 0 and rank 1", "same files")


@needs_mpi
def test_ctrl_c_under_mpiexec_saves_once_and_every_rank_stops(corpus, tmp_path):
    proc = subprocess.Popen([MPIEXEC, "-n", "2", sys.executable, TRAIN, "--data", str(corpus), *TINY, "--zero", "1",
                             "--max-steps", "100000", "--eval-every", "100000"],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    line = ""
    while not line.startswith("step 3/"):
        line = proc.stdout.readline()
        assert line, proc.stderr.read()
    proc.send_signal(signal.SIGINT)              # mpiexec passes it on to every rank
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err            # interrupted, as one process is
    assert out.count("continue with --resume") == 1 and out.count("val loss") == 1
    ck = checkpoint.load(str(tmp_path / "out" / "last.npz"), optimizer=True)
    assert 3 <= ck.step < 100000 and len(ck.opt_state) == len(tiny_model().params) * 2 + 1


class FakeStream:
    ptr = 0

    def record(self):
        return "event"

    def wait_event(self, event):
        pass


class RecordingNccl(FakeNccl):
    """NCCL's communicator stand-in: records each all-reduce (address, count) in a shared log."""
    NCCL_FLOAT32, NCCL_FLOAT64, NCCL_SUM = 7, 8, 0

    def __init__(self, log):
        super().__init__(b"\x01" * 128)
        self.log = log

    def NcclCommunicator(self, size, uid, rank):
        return self

    def allReduce(self, send, recv, count, dtype, op, stream):
        assert send == recv and dtype == self.NCCL_FLOAT64 and op == self.NCCL_SUM
        self.log.append(("all-reduce", send, count))


def test_each_bucket_is_all_reduced_as_soon_as_the_backward_of_its_layers_is_done():
    """The overlap's bookkeeping, on the CPU with stand-ins for cupy's streams and NCCL (their GPU run is not here)."""
    from types import SimpleNamespace
    model, log = tiny_model(), []
    model.split_batch = None                  # NCCL runs on GPUs, where a batch goes through the model in one piece
    block_backward = model._block_backward

    def logged_block_backward(dx, layer, d_layer, cache):
        dx = block_backward(dx, layer, d_layer, cache)
        log.append(("layer done", model.layers.index(layer)))
        return dx
    model._block_backward = logged_block_backward
    fake_cupy = SimpleNamespace(cuda=SimpleNamespace(Stream=lambda non_blocking: FakeStream(),
                                                     get_current_stream=lambda: FakeStream()))
    buckets = dist.plan_buckets(model.params.layout, model.config.n_layers, 1, 8)      # one bucket per layer
    reducer = dist.NCCLReducer(FakeMPIComm(0, 1, None), model, buckets, dist.shard_bounds(model.params.layout.size, 1),
                               micro_batches=2, cupy=fake_cupy, nccl=RecordingNccl(log))
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 9))
    _, grads = model.loss_and_grads(tokens[:, :-1], tokens[:, 1:])
    assert all(entry[0] == "layer done" for entry in log)                  # first micro-batch: nothing sent yet
    log.clear()
    model.loss_and_grads(tokens[:, :-1], tokens[:, 1:], grads=grads)
    log.append(("backward returned",))
    reducer.all_reduce(grads.flat)
    sends = {(address(grads.flat[a:b]), b - a): (a, b, ready) for a, b, ready in buckets}
    expected = []
    for i in reversed(range(model.config.n_layers)):
        expected += [("layer done", i), ("all-reduce", *next(k for k, v in sends.items() if v[2] == i))]
    a, b, _ = buckets[-1]
    expected += [("backward returned",), ("all-reduce", address(grads.flat[a:b]), b - a)]
    assert log == expected


def test_zero1_on_nccl_sends_each_shard_to_its_owner_in_one_group():
    """ZeRO-1's NCCL calls, on the CPU with stand-ins (their GPU run is not here): one grouped reduce per shard to
    its owner, then one grouped broadcast per shard from its owner."""
    from types import SimpleNamespace
    model, log = tiny_model(), []

    class GroupedNccl(RecordingNccl):
        def groupStart(self):
            log.append("group start")

        def groupEnd(self):
            log.append("group end")

        def reduce(self, send, recv, count, dtype, op, root, stream):
            assert send == recv and dtype == self.NCCL_FLOAT64 and op == self.NCCL_SUM
            log.append(("reduce", send, count, root))

        def broadcast(self, send, recv, count, dtype, root, stream):
            assert send == recv and dtype == self.NCCL_FLOAT64
            log.append(("broadcast", send, count, root))

    nccl = GroupedNccl(log)
    fake_cupy = SimpleNamespace(cuda=SimpleNamespace(Stream=lambda non_blocking: FakeStream(),
                                                     get_current_stream=lambda: FakeStream()))
    shards = dist.shard_bounds(model.params.layout.size, 7)
    reducer = dist.NCCLReducer(FakeMPIComm(0, 7, None), model, [], shards, micro_batches=1, overlap=False,
                               cupy=fake_cupy, nccl=nccl)
    flat = model.params.flat
    reducer.reduce_scatter(flat, rank=3)
    reducer.all_gather(flat, rank=3)
    per_shard = [(address(flat[a:b]), b - a, owner) for owner, (a, b) in enumerate(shards)]
    assert log == ["group start", *[("reduce", *s) for s in per_shard], "group end",
                   "group start", *[("broadcast", *s) for s in per_shard], "group end"]


def address(array):
    return array.ctypes.data


@needs_mpi
def test_the_planner_refuses_a_timed_step_too_large_for_the_machine(tmp_path):
    r = subprocess.run([sys.executable, "-m", "tinypalm.dist", "--time", "--preset", "palm-8b", "--steps", "1"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert_user_error(r, "--preset palm-8b (8.63B parameters) needs about", "GiB", "smaller preset")
    assert "ZeRO-1" in r.stdout                               # the plan itself is printed first
    r = subprocess.run([sys.executable, "-m", "tinypalm.dist", "--time", "--preset", "tiny", "--ranks", "3", "--steps",
                        "1", "--warmup", "0"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "note: the plan is for --ranks 3; the step is timed on the 1 rank(s)" in r.stdout and "timed: 1 rank(s)" in r.stdout


def test_the_timed_data_parallel_step_runs_under_mpiexec(tmp_path):
    result = subprocess.run([MPIEXEC, "-n", "2", sys.executable, "-m", "tinypalm.dist", "--time", "--preset", "tiny",
                             "--zero", "1", "--steps", "2", "--warmup", "1"], cwd=tmp_path, capture_output=True,
                            text=True, timeout=120, env=ENV)
    assert result.returncode == 0, result.stderr
    assert "on 2 ranks" in result.stdout and "2 rank(s) x batch 12 x 64" in result.stdout
    assert result.stdout.count("tokens/s in all") == 1 and "reduce-scatter alone" in result.stdout
