"""The DeepSpeed JSON entry: `"optimizer": {"type": "LionDist", "params": {...}}`.

Config checks run in-process with a stand-in `deepspeed` module (they must fail before DeepSpeed's slow
start). One 2-rank run builds an engine from every launch/ds_*.json config (ZeRO 1, 2, 3, 3 + optimizer
offload), stage 0, ZeRO-3 with many sub-groups, and the `register()` path: each must hand DeepSpeed a
`lion_dist.Lion` with the config's hyperparameters (what a sharded Lion then computes, stage by stage, is
`test_zero.py`'s sharded == unsharded test). It checks the batch guard's DeepSpeed arithmetic (also on the
`register()` path, where the factory reads the config Hugging Face or Accelerate published, and warns that it does
not know the batch where nothing was published).
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch

import lion_dist.deepspeed as lds
from lion_dist import Lion, SmallBatchWarning, batch_guard
from tests.distributed import spawn

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_CONFIGS = sorted((ROOT / "launch").glob("ds_*.json"))
STEPS = 3


def liondist(params: dict | None = None, **top) -> dict:
    """A small DeepSpeed config whose optimizer is "LionDist"."""
    section = {"type": "LionDist"} if params is None else {"type": "LionDist", "params": params}
    return {"train_micro_batch_size_per_gpu": 32, "optimizer": section, **top}


def test_launch_configs_exist_for_every_zero_stage_and_use_liondist() -> None:
    names = [p.name for p in LAUNCH_CONFIGS]
    assert names == ["ds_zero1.json", "ds_zero2.json", "ds_zero3.json", "ds_zero3_offload.json"]
    for path in LAUNCH_CONFIGS:
        config = lds.load_config(path)
        assert lds.lion_kwargs(config) == {"lr": 0.01, "betas": (0.9, 0.99), "weight_decay": 0.1}
    assert lds.load_config(ROOT / "launch/ds_zero3_offload.json")["zero_optimization"]["offload_optimizer"]


def test_other_optimizer_types_are_left_to_deepspeed() -> None:
    assert lds.lion_kwargs({"optimizer": {"type": "Lion", "params": {"lr": 1e-4, "whatever": 1}}}) is None
    assert lds.lion_kwargs({"optimizer": {"type": "AdamW"}}) is None
    assert lds.lion_kwargs({"train_batch_size": 64}) is None


def test_params_become_lion_keyword_arguments() -> None:
    kwargs = lds.lion_kwargs(liondist({"lr": 3e-4, "momentum_dtype": "bfloat16", "nonfinite": "error"}))
    assert kwargs == {"lr": 3e-4, "momentum_dtype": torch.bfloat16, "nonfinite": "error"}
    assert lds.lion_kwargs(liondist()) == {}


@pytest.mark.parametrize(
    ("config", "error", "match"),
    [
        (liondist({"lrr": 1e-4}), ValueError, r"unknown key 'lrr' for \"LionDist\" \(did you mean 'lr'\?\)"),
        (liondist({"betas": [0.9]}), ValueError, r"optimizer.params\": betas must be a pair"),
        (liondist({"lr": -1}), ValueError, r"optimizer.params\": lr must be a finite number > 0, got -1"),
        (liondist({"momentum_dtype": "float16"}), ValueError, "momentum_dtype\" is 'float16'; use one of"),
        (liondist({"global_batch_size": 64}), ValueError, "has 'global_batch_size'.*set \"train_batch_size\""),
        (liondist({"micro_batch_size": 8}), ValueError, 'set "train_micro_batch_size_per_gpu"'),
        (liondist({"grad_accum_steps": 2}), ValueError, 'set "gradient_accumulation_steps"'),
        (liondist({"batch_size_policy": "loud"}), ValueError, "batch_size_policy must be one of"),
        ({"optimizer": {"type": "liondist"}}, ValueError, "is 'liondist'; write \"LionDist\" \\(case-sensitive\\)"),
        ({"optimizer": "LionDist"}, ValueError, '"optimizer" must be an object'),
        ({"optimizer": {"params": {}}}, ValueError, 'needs a "type" string'),
        ({"optimizer": {"type": "LionDist", "lr": 1e-4}}, ValueError, "unknown key 'lr'; it takes \"type\" and"),
        ({"optimizer": {"type": "LionDist", "params": [1e-4]}}, ValueError, "must be an object of Lion arguments"),
    ],
)
def test_bad_optimizer_sections_name_the_key(config: dict, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        lds.lion_kwargs(config)


def test_bad_config_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"ds_missing.json' does not exist"):
        lds.load_config(tmp_path / "ds_missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text('{"optimizer": {"type": "LionDist",}}')
    with pytest.raises(ValueError, match=r"broken.json' is not valid JSON: .*line 1"):
        lds.load_config(broken)
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        lds.load_config(listed)
    with pytest.raises(TypeError, match="path to a JSON file or a dict, got int"):
        lds.load_config(3)


@pytest.fixture
def fake_deepspeed(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """A stand-in `deepspeed` whose initialize records its arguments and stops there."""
    calls: list[dict] = []

    def initialize(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("fake deepspeed.initialize reached")

    monkeypatch.setitem(sys.modules, "deepspeed", types.SimpleNamespace(initialize=initialize))
    return calls


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({}, "needs a DeepSpeed config: pass config="),
        (
            {"config": liondist(), "args": types.SimpleNamespace(deepspeed_config="ds.json")},
            "pass the DeepSpeed config once, got it as config and args.deepspeed_config",
        ),
        ({"config": liondist(), "optimizer": torch.optim.SGD}, 'got both optimizer= and a "LionDist" optimizer'),
        (
            {"config": liondist({"cautious_factor": 0.5}, zero_optimization={"stage": 2})},
            'cautious_factor": cautious Lion rescales by a mean over each whole tensor',
        ),
        ({"config": liondist({"cautious_factor": 0.5}, bf16={"enabled": True})}, "or fp16/bf16"),
    ],
)
def test_initialize_refuses_before_starting_deepspeed(fake_deepspeed: list, kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        lds.initialize(model=torch.nn.Linear(2, 2), **kwargs)
    assert fake_deepspeed == []


def test_initialize_hands_other_optimizers_to_deepspeed_untouched(fake_deepspeed: list, tmp_path: Path) -> None:
    config = {"train_batch_size": 64, "optimizer": {"type": "Lion", "params": {"lr": 1e-4}}}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    args = types.SimpleNamespace(deepspeed_config=str(path))
    for call_kwargs in ({"config": config}, {"config_params": str(path)}, {"args": args}):
        with pytest.raises(RuntimeError, match=r"fake deepspeed.initialize reached"):
            lds.initialize(model=torch.nn.Linear(2, 2), **call_kwargs)
        seen = fake_deepspeed.pop()
        assert seen["optimizer"] is None
        for key in ("config", "config_params", "args"):
            assert seen[key] is call_kwargs.get(key)


def test_initialize_gives_deepspeed_a_lion_callable_and_an_amended_copy(fake_deepspeed: list) -> None:
    config = liondist(
        {"lr": 0.02, "weight_decay": 0.5}, zero_optimization={"stage": 3, "offload_optimizer": {"device": "cpu"}}
    )
    original = json.loads(json.dumps(config))
    args = types.SimpleNamespace(deepspeed_config=config, local_rank=0)
    with pytest.raises(RuntimeError, match=r"fake deepspeed.initialize reached"):
        lds.initialize(args=args, model=torch.nn.Linear(2, 2))
    (seen,) = fake_deepspeed
    assert config == original and args.deepspeed_config is config  # the caller's objects are not changed
    assert seen["args"].deepspeed_config is None and seen["args"].local_rank == 0
    assert "optimizer" not in seen["config"]
    assert seen["config"]["zero_allow_untested_optimizer"] is True
    assert seen["config"]["zero_force_ds_cpu_optimizer"] is False
    built = seen["optimizer"]([torch.nn.Parameter(torch.zeros(3))])
    assert type(built) is Lion
    assert (built.defaults["lr"], built.defaults["weight_decay"]) == (0.02, 0.5)


@pytest.fixture
def zero_utils(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A stand-in for `deepspeed.runtime.zero.utils` and its list of ZeRO-tested optimizers."""
    utils = types.ModuleType("deepspeed.runtime.zero.utils")
    utils.ZERO_SUPPORTED_OPTIMIZERS = [torch.optim.Adam]
    for name in ("deepspeed", "deepspeed.runtime", "deepspeed.runtime.zero"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setattr(sys.modules["deepspeed.runtime.zero"], "utils", utils, raising=False)
    monkeypatch.setitem(sys.modules, "deepspeed.runtime.zero.utils", utils)
    return utils


def test_register_adds_torch_optim_liondist_and_lists_lion_as_zero_tested(
    monkeypatch: pytest.MonkeyPatch, zero_utils: types.ModuleType
) -> None:
    monkeypatch.delattr(torch.optim, "LionDist", raising=False)
    supported = zero_utils.ZERO_SUPPORTED_OPTIMIZERS
    lds.register()
    assert torch.optim.LionDist is lds.LionDist
    assert supported == [torch.optim.Adam, Lion]
    lds.register()  # idempotent
    assert supported == [torch.optim.Adam, Lion]
    monkeypatch.setattr(torch.optim, "LionDist", Lion)  # what register() used to add: replaced
    lds.register()
    assert torch.optim.LionDist is lds.LionDist
    monkeypatch.setattr(torch.optim, "LionDist", torch.optim.SGD)
    with pytest.raises(RuntimeError, match=r"torch.optim.LionDist is already .*SGD"):
        lds.register()


def test_register_without_deepspeed_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(torch.optim, "LionDist", raising=False)
    for name in ["deepspeed", *(n for n in list(sys.modules) if n.startswith("deepspeed."))]:
        monkeypatch.setitem(sys.modules, name, None)  # makes `import deepspeed` (and its loaded parts) fail
    with pytest.raises(ImportError, match=r"pip install 'lion-dist\[deepspeed\]'"):
        lds.register()
    assert not hasattr(torch.optim, "LionDist")


def test_liondist_factory_converts_and_checks_params_like_initialize() -> None:
    param = torch.nn.Parameter(torch.zeros(3))
    built = lds.LionDist([param], lr=1e-3, betas=[0.9, 0.95], momentum_dtype="bfloat16", global_batch_size=128)
    assert type(built) is Lion
    assert built.defaults["betas"] == (0.9, 0.95) and built.defaults["momentum_dtype"] is torch.bfloat16
    assert built._batch_guard.global_batch_size == 128  # outside a DeepSpeed engine: as given
    assert lds.LionDist([param])._batch_guard.global_batch_size is None
    for kwargs, match in [
        ({"eps": 1e-8}, 'Lion has no epsilon .* remove "eps"'),
        ({"lrr": 1e-3}, "unknown key 'lrr' for \"LionDist\" \\(did you mean 'lr'\\?\\)"),
        ({"lr": "auto"}, 'optimizer.params": lr must be a finite number > 0'),
    ]:
        with pytest.raises(ValueError, match=match):
            lds.LionDist([param], **kwargs)


def test_eps_is_refused_by_initialize_too() -> None:
    with pytest.raises(ValueError, match="Lion has no epsilon"):
        lds.lion_kwargs(liondist({"lr": 1e-4, "eps": 1e-8}))


@pytest.mark.slow
def test_lion_dist_imports_without_deepspeed() -> None:
    code = (
        "import sys; sys.modules['deepspeed'] = None\n"  # makes `import deepspeed` fail
        "import lion_dist, lion_dist.deepspeed as lds\n"
        "print(lds.lion_kwargs(lds.load_config('launch/ds_zero2.json')))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "'lr': 0.01" in result.stdout


# --------------------------------------------------------------------------- DeepSpeed on 2 ranks


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))


def batches(steps: int = STEPS, size: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A few seeded batches, the same on every rank."""
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(size, 7, generator=gen), torch.randn(size, 3, generator=gen)) for _ in range(steps)]


def hyperparameters(opt: torch.optim.Optimizer) -> list[dict]:
    """Each param group's Lion hyperparameters (the keys of `Lion.defaults`), without the params."""
    return [{key: group[key] for key in opt.defaults} for group in opt.param_groups]


def _train(engine) -> None:
    for x, y in batches():
        engine.backward(torch.nn.functional.mse_loss(engine(x), y))
        engine.step()


def _guard_messages(config: dict) -> tuple[list[str], str | None]:
    batch_guard._warned_this_process.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            lds.initialize(model=make_model(), config=config)
        except ValueError as error:
            return [], str(error)
    return [str(w.message) for w in caught if issubclass(w.category, SmallBatchWarning)], None


def _accelerate_guard() -> tuple:
    """Accelerate's own DeepSpeed route (`accelerator.prepare` with a `DummyOptim`): the factory reads the batch
    from the active DeepSpeedPlugin, whose "auto" batch Accelerate fills from the dataloader."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, DummyOptim, InitProcessGroupKwargs

    config = {
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": 2,
        "train_batch_size": "auto",
        "zero_optimization": {"stage": 2},
        "optimizer": {"type": "LionDist", "params": {"lr": 0.01}},
    }
    gloo = InitProcessGroupKwargs(backend="gloo")  # without a GPU Accelerate picks no backend: one process
    accelerator = Accelerator(deepspeed_plugin=DeepSpeedPlugin(hf_ds_config=config), kwargs_handlers=[gloo])
    model = make_model()
    x, y = batches(1)[0]
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    batch_guard._warned_this_process.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine, *_ = accelerator.prepare(model, DummyOptim(model.parameters()), loader)
    guard = engine.basic_optimizer._batch_guard
    warned = [str(w.message) for w in caught if issubclass(w.category, SmallBatchWarning)]
    return guard.global_batch_size, guard.source, warned


def _deepspeed_on_two_ranks(rank: int, world_size: int, launch_configs: list[str]) -> dict:
    import deepspeed

    out: dict = {"groups": {}, "types": {}}
    stage3 = lds.load_config(launch_configs[2])
    runs = {Path(path).stem: path for path in launch_configs}
    runs["stage0"] = {**stage3, "zero_optimization": {"stage": 0}}
    runs["zero3_subgroups"] = {**stage3, "zero_optimization": {"stage": 3, "sub_group_size": 40}}
    for name, config in runs.items():
        engine, *_ = lds.initialize(model=make_model(), config=config)
        out["types"][name] = type(engine.basic_optimizer).__name__
        out["groups"][name] = hyperparameters(engine.basic_optimizer)
        if name == "zero3_subgroups":
            out["subgroups"] = len(engine.optimizer.fp16_groups)  # Lion.step() runs once per sub-group

    lds.register()  # the plain deepspeed.initialize path
    plain = {
        "train_micro_batch_size_per_gpu": 32,
        "zero_optimization": {"stage": 2},
        "zero_allow_untested_optimizer": True,
        "optimizer": {"type": "LionDist", "params": {"lr": 0.01, "weight_decay": 0.1, "global_batch_size": 64}},
    }
    engine, *_ = deepspeed.initialize(model=make_model(), config=plain)
    out["types"]["registered"] = type(engine.basic_optimizer).__name__
    out["groups"]["registered"] = hyperparameters(engine.basic_optimizer)

    # what the HF Trainer passes: no zero_allow_untested_optimizer, no batch in params, strings for dtypes; and
    # what it publishes (an HfDeepSpeedConfig kept alive: the Trainer's TrainingArguments holds one)
    from transformers.integrations import HfDeepSpeedConfig

    hf_like = {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_accumulation_steps": 2,
        "train_batch_size": 32,
        "zero_optimization": {"stage": 3},
        "optimizer": {"type": "LionDist", "params": {"lr": 0.01, "momentum_dtype": "float32", "min_batch_size": 16}},
    }
    published = HfDeepSpeedConfig(hf_like)
    engine, *_ = deepspeed.initialize(model=make_model(), config=hf_like)
    guard = engine.basic_optimizer._batch_guard
    out["registered_guard"] = (guard.global_batch_size, guard.source, guard.min_batch_size, guard.policy)
    other = {**hf_like, "optimizer": {"type": "LionDist", "params": {"lr": 0.02}}}  # not the published config's
    engine, *_ = deepspeed.initialize(model=make_model(), config=other)
    out["other_guard"] = engine.basic_optimizer._batch_guard.global_batch_size
    del published  # nothing published: the guard says at the first step that it does not know the batch
    batch_guard._warned_this_process.clear()
    engine, *_ = deepspeed.initialize(model=make_model(), config={**hf_like, "zero_optimization": {"stage": 1}})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(engine)
    out["unpublished"] = [str(w.message) for w in caught if issubclass(w.category, SmallBatchWarning)]

    small = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2, "zero_optimization": {"stage": 1}}
    out["small"] = _guard_messages({**small, "optimizer": {"type": "LionDist"}})
    out["small_error"] = _guard_messages(
        {**small, "optimizer": {"type": "LionDist", "params": {"batch_size_policy": "error"}}}
    )
    out["enough"] = _guard_messages({**small, "train_micro_batch_size_per_gpu": 16, "optimizer": {"type": "LionDist"}})
    out["accelerate"] = _accelerate_guard()  # last: it starts Accelerate's process-wide state
    return out


@pytest.mark.slow
def test_every_route_hands_deepspeed_the_configs_lion_and_the_guard_sees_train_batch_size() -> None:
    results = spawn(_deepspeed_on_two_ranks, 2, [str(p) for p in LAUNCH_CONFIGS], env={"DS_ACCELERATOR": "cpu"})
    expected = hyperparameters(Lion(make_model().parameters(), lr=0.01, weight_decay=0.1))
    for result in results:
        assert set(result["groups"]) == {
            "ds_zero1", "ds_zero2", "ds_zero3", "ds_zero3_offload", "stage0", "zero3_subgroups", "registered"
        }  # fmt: skip
        assert set(result["types"].values()) == {"Lion"}
        assert result["subgroups"] > 1
        for name, groups in result["groups"].items():
            assert groups == expected, name
        warned, error = result["small_error"]  # "error" raises on every rank
        assert warned == []
        assert (
            "effective batch is 32 (DeepSpeed train_batch_size = micro batch 8 x gradient_accumulation_steps" in error
        )
        assert "2 x data-parallel size 2)" in error
        assert result["enough"] == ([], None)
        assert result["registered_guard"] == (
            32,
            "DeepSpeed train_batch_size = micro batch 8 x gradient_accumulation_steps 2 x data-parallel size 2",
            16,
            "warn",
        )
        assert result["other_guard"] is None  # a published config for other params is not this engine's
        batch, source, _ = result["accelerate"]
        assert (batch, source) == (
            32,
            "DeepSpeed train_batch_size = micro batch 8 x gradient_accumulation_steps 2 x data-parallel size 2",
        )
    rank0, rank1 = results
    assert len(rank0["small"][0]) == 1 and rank1["small"] == ([], None)
    (unknown,) = rank0["unpublished"]
    assert "does not know the effective batch size" in unknown and rank1["unpublished"] == []
    (small,) = rank0["accelerate"][2]  # 32 < the default minimum 64, on rank 0 only
    assert "effective batch is 32 (DeepSpeed train_batch_size" in small and rank1["accelerate"][2] == []
    assert "effective batch is 32 (DeepSpeed train_batch_size = micro batch 8" in rank0["small"][0][0]
