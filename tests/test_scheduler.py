"""Continuous batching on a tiny bundle: answers that do not depend on the batch, adapters that come
and go between steps, and rows freed the moment a request is cancelled."""

import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner

from slmops.cli import cli
from slmops.shipping.batching import BatchModel, LoraStack, read_onnx_adapter
from slmops.shipping.manifest import BundleError
from slmops.shipping.runtime import Completion, Runtime, Sampling
from slmops.shipping.scheduler import Scheduler
from test_export import ALL, make_adapter

PROMPTS = ["the sea", "a b c d e f g h i j k l m n o p", "hello there, how are you today?", "x"]


@pytest.fixture(scope="module")
def bundle(tiny_model, tmp_path_factory):
    """Two adapters of different ranks and modules: q/v at rank 4, every linear layer at rank 8."""
    root = tmp_path_factory.mktemp("batching")
    qv = make_adapter(tiny_model, root / "qv", 4, ["q_proj", "v_proj"], seed=1, std=0.5)
    every = make_adapter(tiny_model, root / "all", 8, ALL, seed=2, std=0.5)
    out = root / "bundle"
    args = ["export", "-m", str(tiny_model), "-a", f"qv={qv}", "-a", f"all={every}", "-p", "fp32", "-o", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def runtime(bundle):
    return Runtime(bundle, threads=2)


@pytest.fixture
def scheduler(runtime):
    scheduler = Scheduler(runtime, slots=4, threads=2)
    scheduler.start()
    yield scheduler
    scheduler.stop()


def run(scheduler: Scheduler, jobs, sampling=Sampling(max_new_tokens=24)) -> list[Completion]:
    """Submit every (prompt, adapter) at once and wait for all of them."""
    results: dict[int, Completion] = {}
    done = threading.Event()
    lock = threading.Lock()

    def sink(i):
        def emit(event):
            if event.kind == "token":
                return
            assert event.kind == "done", event.text
            with lock:
                results[i] = event.completion
                if len(results) == len(jobs):
                    done.set()

        return emit

    for i, (prompt, adapter) in enumerate(jobs):
        scheduler.submit(scheduler.runtime.encode(prompt), adapter, sampling, (), sink(i))
    assert done.wait(120)
    return [results[i] for i in range(len(jobs))]


def test_prefill_logits_match_onnxruntime_genai_per_adapter(runtime, bundle):
    # The masked, stacked LoRA computes what the bundle's own graph computes with one adapter bound.
    import onnxruntime_genai as og

    model = BatchModel(bundle, slots=2, max_len=64, threads=2, lora_width=64)
    for name in runtime.adapter_names:
        model.stack.add(name, read_onnx_adapter(runtime.manifest.adapter_file(bundle, name)))
    tokens = runtime.encode("hello there")
    for adapter in (None, "qv", "all"):
        generator = og.Generator(runtime.model, og.GeneratorParams(runtime.model))
        if adapter:
            runtime.load_adapter(adapter)
            generator.set_active_adapter(runtime.adapters, adapter)
        generator.append_tokens(tokens)
        got = model.run(0, np.asarray([tokens]), [len(tokens)], [adapter])[0]
        expected = generator.get_output("logits").reshape(-1, got.shape[-1])[-1]
        assert np.abs(got - expected).max() < 1e-4, adapter


def test_greedy_answers_do_not_depend_on_the_batch(scheduler):
    jobs = [(p, a) for p in PROMPTS for a in (None, "qv", "all")]
    alone = [run(scheduler, [job])[0].tokens for job in jobs]
    # three times as many requests as rows: they wait, join and leave the batch, and rows move
    assert scheduler.prefix.hits == 0  # each (prompt, adapter) came once: nothing to reuse yet
    together = [c.tokens for c in run(scheduler, jobs * 3)]
    assert together == alone * 3
    assert scheduler.prefix.hits > 0  # and answers from cached prefixes are the same
    assert len({tuple(t) for t in alone}) > len(PROMPTS)  # the adapters change the answers


def test_sampled_answers_follow_the_seed(scheduler):
    sampling = Sampling(max_new_tokens=16, temperature=1.0, seed=7)
    first, second = run(scheduler, [("the sea", "qv")] * 2, sampling)
    assert first.tokens == second.tokens
    other = run(scheduler, [("the sea", "qv")], Sampling(max_new_tokens=16, temperature=1.0, seed=8))[0]
    assert other.tokens != first.tokens


def test_adapters_come_and_go_without_changing_other_answers(scheduler, runtime, bundle):
    jobs = [(p, a) for p in PROMPTS for a in (None, "qv", "all")]
    before = [c.tokens for c in run(scheduler, jobs)]
    tensors = read_onnx_adapter(runtime.manifest.adapter_file(bundle, "all"))
    scheduler.add_adapter("again", tensors)
    assert [c.tokens for c in run(scheduler, jobs)] == before
    # the same weights in other rank columns give the same answers
    assert [c.tokens for c in run(scheduler, [(p, "again") for p in PROMPTS])] == before[2::3]
    scheduler.remove_adapter("all")
    with pytest.raises(BundleError, match="unknown adapter 'all'"):
        scheduler.submit([1, 2], "all", Sampling(), (), lambda event: None)
    assert [c.tokens for c in run(scheduler, [(p, "qv") for p in PROMPTS])] == before[1::3]


def test_cancel_frees_the_row_at_once(scheduler):
    events = []
    first = threading.Event()

    def emit(event):
        events.append(event.kind)
        first.set()

    room = scheduler.max_len - 8
    seq = scheduler.submit(scheduler.runtime.encode("the sea"), "qv", Sampling(max_new_tokens=room), (), emit)
    assert first.wait(60)
    scheduler.cancel(seq)
    deadline = time.monotonic() + 2
    while scheduler.load != (0, 0):
        assert time.monotonic() < deadline, "the cancelled request still holds its row"
        time.sleep(0.01)
    assert "done" not in events and len(seq.text.tokens) < seq.limit


def test_a_prompt_longer_than_the_context_is_refused(runtime):
    scheduler = Scheduler(runtime, slots=2, max_len=16)
    with pytest.raises(BundleError, match="this server's context is 16; shorten the prompt"):
        scheduler.submit(list(range(20)), None, Sampling(), (), lambda event: None)


def _stack(width: int) -> LoraStack:
    return LoraStack({"l0.lora_A.w": (6, 0), "l0.lora_B.w": (0, 5)}, width)


def _lora(rank: int, value: float) -> dict:
    return {"l0.lora_A.w": np.full((6, rank), value, np.float32), "l0.lora_B.w": np.full((rank, 5), value, np.float32)}


def test_lora_stack_keeps_each_adapters_columns():
    stack = _stack(10)
    stack.add("a", _lora(4, 1.0))
    stack.add("b", _lora(4, 2.0))
    assert stack.offsets == {"a": (0, 4), "b": (4, 8)}
    with pytest.raises(BundleError, match="no room for adapter 'c': it takes 4 rank columns, 2 of 10 are free"):
        stack.add("c", _lora(4, 3.0))
    stack.remove("a")
    assert not stack.values["l0.lora_A.w"][:, :4].any() and stack.values["l0.lora_A.w"][:, 4:8].all()
    stack.add("c", _lora(3, 3.0))  # the first free run that fits; b stays where it was
    assert stack.offsets == {"b": (4, 8), "c": (0, 3)}
    assert stack.mask(["b", None, "c"])[:, 0].tolist() == [
        [0, 0, 0, 0, 1, 1, 1, 1, 0, 0],
        [0] * 10,
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
    ]


def test_lora_stack_refuses_tensors_the_graph_does_not_take():
    stack = _stack(10)
    with pytest.raises(BundleError, match="has 1 tensor.s. the bundle's graph has no input for"):
        stack.add("x", {**_lora(2, 1.0), "l9.lora_A.w": np.zeros((6, 2), np.float32)})
    with pytest.raises(BundleError, match=r"l0.lora_A.w is \[7, 2\], the graph takes \[6, r\]"):
        stack.add("x", {"l0.lora_A.w": np.zeros((7, 2), np.float32)})


def test_prefix_cache_blocks_chain_evict_and_forget():
    from slmops.shipping.prefix_cache import BLOCK, PrefixCache

    cache = [np.arange(2 * 1 * 40 * 2, dtype=np.float32).reshape(2, 1, 40, 2)]  # 2 rows, 40 positions
    prefix = PrefixCache(max_bytes=3 * 4 * BLOCK * 2, block_bytes=4 * BLOCK * 2)  # room for 3 blocks
    prompt = list(range(30))
    prefix.store(prompt, 1, cache, row=0)  # 3 full blocks of 8
    assert [b.tokens[0] for b in prefix.lookup(prompt, 1)] == [0, 8, 16]
    assert len(prefix.lookup(prompt[:17], 1)) == 1  # two tokens are always left to compute
    assert prefix.lookup(prompt, 2) == []  # another adapter's cache is another cache
    assert len(prefix.lookup([0, 1, 2, 9] + prompt[4:], 1)) == 0  # a different first block breaks the chain
    restored = [np.zeros_like(cache[0])]
    assert PrefixCache.restore(prefix.lookup(prompt, 1), restored, row=1) == 24
    assert (restored[0][1, :, :24] == cache[0][0, :, :24]).all() and not restored[0][1, :, 24:].any()
    prefix.store(list(range(100, 110)), 1, cache, row=1)  # a fourth block: the least recently used goes
    assert len(prefix.blocks) == 3 and len(prefix.lookup(prompt, 1)) == 0  # its first block was evicted
    prefix.forget(1)
    assert not prefix.blocks


def test_a_stopped_scheduler_refuses_new_requests(runtime):
    from slmops.shipping.scheduler import ShuttingDown

    scheduler = Scheduler(runtime, slots=2)
    scheduler.start()
    scheduler.stop()
    with pytest.raises(ShuttingDown, match="shutting down; retry on another instance"):
        scheduler.submit([1, 2, 3], None, Sampling(), (), lambda event: None)


def test_bad_requests_and_adapters_are_refused_one_by_one(scheduler):
    from slmops.shipping.batching import AdapterClash
    from slmops.shipping.scheduler import UnknownAdapter

    with pytest.raises(BundleError, match="the prompt is empty"):
        scheduler.submit([], None, Sampling(), (), lambda event: None)
    with pytest.raises(UnknownAdapter, match="'nope' is not loaded"):
        scheduler.remove_adapter("nope")
    stack = scheduler.model.stack
    tensors = dict(stack.adapters["qv"])
    with pytest.raises(AdapterClash, match="'qv' is already loaded"):
        scheduler.add_adapter("qv", tensors)
    key = next(iter(tensors))
    broken = {**tensors, key: np.full_like(tensors[key], np.inf)}
    with pytest.raises(BundleError, match="holds NaN or infinite values"):
        scheduler.add_adapter("broken", broken)
    assert sorted(scheduler.adapters) == ["all", "qv"]
    assert run(scheduler, [("the sea", "qv")])[0].tokens  # and the loop still serves


def test_a_failed_prefill_fails_only_its_own_requests(scheduler, monkeypatch):
    events = {"long": [], "bad": []}
    started = threading.Event()

    def sink(name):
        def emit(event):
            events[name].append(event.kind)
            started.set()

        return emit

    run_model = scheduler.model.run
    broken = threading.Event()

    def model_run(start, tokens, *args, **kwargs):  # slow steps, so the long request is still running
        time.sleep(0.005)
        if broken.is_set() and tokens.shape[1] > 1:
            raise RuntimeError("boom")
        return run_model(start, tokens, *args, **kwargs)

    monkeypatch.setattr(scheduler.model, "run", model_run)
    room = scheduler.max_len - 8
    scheduler.submit(scheduler.runtime.encode("the sea"), "qv", Sampling(max_new_tokens=room), (), sink("long"))
    assert started.wait(60)
    broken.set()
    scheduler.submit(scheduler.runtime.encode("x y z"), None, Sampling(max_new_tokens=4), (), sink("bad"))
    deadline = time.monotonic() + 30
    while "error" not in events["bad"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert "done" not in events["long"]  # it was running when the other prefill failed
    broken.clear()
    while "done" not in events["long"]:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert "error" not in events["long"]
