#!/usr/bin/env python3
"""Golden outputs of TRL 1.12's DPOTrainer, for the Rust DPO tests (which need
no Python). Every number comes from TRL's own code (`DPOTrainer._compute_loss`,
`DPOTrainer._prepare_dataset`, `DataCollatorForPreference`,
`DPOTrainer.evaluate`); no loss formula is typed again here.

Usage (from the repository root, after `cargo run -- fixtures`):
    .venv-golden/bin/python scripts/make_golden_dpo.py fixtures tests
writes, in tests/golden_dpo/:

- losses.json: the loss family of `DPOTrainer._compute_loss`, called as the
  unbound method `DPOTrainer._compute_loss(fake_self, model, inputs, False)`.
  `fake_self` is a types.SimpleNamespace (a subclass that notes which
  attributes are read; the script checks that every one it sets is read)
  holding only what the method reads (model with .training=True so the metrics land in "train"; an accelerator
  stub whose gather/gather_for_metrics/unwrap_model are the identity;
  aux_loss_enabled=False; precompute_ref_logps=True so the reference
  log-probs are read from inputs["ref_chosen_logps"/"ref_rejected_logps"],
  also for the ld_alpha case; beta, label_smoothing, loss_types,
  loss_weights (`loss_weights or [1.0] * len(loss_types)` as in __init__),
  ld_alpha, f_divergence_type, f_alpha_divergence_coef, use_weighting,
  args.discopop_tau, _metrics, _total_train_tokens = 0). `model` returns a
  fixed leaf tensor of logits (requires_grad), so loss.backward() gives the
  gradient with respect to the logits.
  Inputs, float32, after torch.manual_seed(0): B = 3 pairs, rows 0..2 chosen
  and 3..5 rejected (TRL's layout), T = 7, V = 9;
  logits = randn(6, 7, 9) * 2, input_ids = randint(0, 9, (6, 7)) with the
  rejected row's prompt copied from its chosen row, padding set to 0 and
  input_ids[0, t] = argmax(logits[0, t - 1]) for t = 3, 5 (so that
  mean_token_accuracy is not 0);
  (prompt, chosen, rejected) lengths (2, 5, 3), (3, 2, 4), (4, 2, 2), right
  padded; attention_mask 1 on prompt and completion; reference log-probs
  set so that the policy-minus-reference log-ratios are chosen [0.5, 2.0,
  -1.2] and rejected [1.5, -1.5, 1.8] (delta -1.0, 3.5, -3.0); then the sorts
  in aot (policy and reference chosen-minus-rejected) and in aot_unpaired
  (chosen and rejected log-ratios) are different permutations, so neither
  loss equals its unsorted counterpart. The file holds the exact tensors.
  Cases: each of the 15 loss types at beta 0.1 (exo_pair with
  label_smoothing 1e-3, robust with 0.1, discopop with tau 0.05); sigmoid,
  ipo and aot at beta 0.5; sigmoid with the forward_kl, js_divergence and
  alpha_divergence (coef 0.5) f-divergences, ipo with alpha_divergence (coef
  0.3); sigmoid, ipo and apo_zero with use_weighting; sigmoid with ld_alpha
  0.5; sigmoid+sft with loss_weights [1.0, 0.5] and hinge+bco_pair+sft with
  none. Each case records the loss, d loss / d logits and every metric
  _compute_loss logged.

- policy/ and reference/: two tiny Llama models written by transformers
  (hidden 32, intermediate 64, 1 layer, 4 heads, 2 KV heads, initializer_range
  0.2 so the logits are far from uniform, untied embeddings), initialised by
  `AutoModelForCausalLM.from_config` after torch.manual_seed(0) (policy) and
  seed 1 (reference), with the tokenizer files of fixtures/models/tiny-llama.

- pairs.jsonl: the first 10 lines of fixtures/data/preferences.jsonl, byte
  for byte, and eval.json: `DPOTrainer(policy, ref_model=reference, ...)
  .evaluate()` at step 0 on them (per_device_eval_batch_size 4: batches of
  4, 4 and 2 pairs) for sigmoid, ipo, hinge, robust (label_smoothing 0.1) and
  sigmoid at beta 0.5, the per-batch losses and metrics seen by a spy on
  compute_loss/log, and the tokenized rows of trainer.eval_dataset. The
  wall-clock keys (eval_runtime, eval_samples_per_second,
  eval_steps_per_second) are left out.

- prep.json: `DPOTrainer._prepare_dataset` (called with a namespace holding
  only `_tokenizer` as self, and a real DPOConfig) and
  `DataCollatorForPreference` on each example alone. "text": rows 0-3 of
  fixtures/data/preferences.jsonl, then row 5 with EOS already ending
  chosen, row 9 with rejected = chosen, row 6 with chosen "" (tokenizer
  tests/golden_dpo/policy, max_length 1024, keep_start); "implicit": rows
  0-3 as prompt+chosen / prompt+rejected with no prompt column;
  "keep_start_short" and "keep_end_short": the text rows at max_length 6
  (keep_start drops the rows whose prompt has 6 tokens); "chat" and
  "chat_implicit": the first 3 rows of fixtures/data/chat-preferences.jsonl
  on fixtures/models/tiny-chat, with an explicit prompt and as whole
  conversations. An extra column `_row` carries each
  row's index through the dataset maps; it is not part of the rows written.

Float32 everywhere, eager attention, torch with one thread.
"""
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import types
import warnings
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")

import accelerate  # noqa: E402
import datasets  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import trl  # noqa: E402
from datasets import Dataset  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LlamaConfig  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402
from trl.data_utils import extract_prompt  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: E402
from trl.trainer.utils import selective_log_softmax  # noqa: E402

torch.set_num_threads(1)

SCRIPT = "scripts/make_golden_dpo.py"
OUT = "golden_dpo"


def made_by(full=False):
    d = {
        "script": SCRIPT,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }
    if full:
        d.update(accelerate=accelerate.__version__, datasets=datasets.__version__, tokenizers=tokenizers.__version__)
    return d


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def dump(path, obj, list_key):
    """JSON with one element of obj[list_key] per line (compact, diffable)."""
    head = {k: v for k, v in obj.items() if k != list_key}
    text = json.dumps(head, ensure_ascii=False)[:-1]
    text += f', "{list_key}": [\n' + ",\n".join(json.dumps(c, ensure_ascii=False) for c in obj[list_key]) + "\n]}\n"
    json.loads(text)
    Path(path).write_text(text)


class Warnings(logging.Handler):
    """Collects what TRL logs (logger.warning) and what Python warns."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.seen = []

    def emit(self, record):
        self.seen.append(record.getMessage())

    def __enter__(self):
        self.seen = []
        logging.getLogger("trl").addHandler(self)
        self._cw = warnings.catch_warnings(record=True)
        self._py = self._cw.__enter__()
        warnings.simplefilter("always")
        return self

    def __exit__(self, *exc):
        self._cw.__exit__(*exc)
        logging.getLogger("trl").removeHandler(self)
        self.seen += [f"{w.category.__name__}: {w.message}" for w in self._py]

    def distinct(self):
        """The distinct messages, less transformers' deprecation of the
        gradient_checkpointing argument (TrainingArguments warns on its own)."""
        out = []
        for m in self.seen:
            if m not in out and "gradient_checkpointing" not in m:
                out.append(m)
        return out


ALL_WARNINGS = defaultdict(int)


def note_warnings(w, where):
    for m in w.seen:
        ALL_WARNINGS[(where, m)] += 1


# ---------------------------------------------------------------------------
# 1. losses.json
# ---------------------------------------------------------------------------

B, T, V = 3, 7, 9
LENGTHS = [(2, 5, 3), (3, 2, 4), (4, 2, 2)]  # (prompt, chosen, rejected) per pair
CHOSEN_LOGRATIOS = [0.5, 2.0, -1.2]
REJECTED_LOGRATIOS = [1.5, -1.5, 1.8]

READ = set()


class FakeSelf(types.SimpleNamespace):
    """A SimpleNamespace that notes which attributes _compute_loss reads."""

    def __getattribute__(self, name):
        if not name.startswith("__"):
            READ.add(name)
        return super().__getattribute__(name)


class LogitsModel:
    def __init__(self, logits):
        self.logits = logits
        self.training = True
        self.kwargs = None

    def __call__(self, **kwargs):
        self.kwargs = sorted(kwargs)
        return types.SimpleNamespace(logits=self.logits)


def loss_inputs():
    torch.manual_seed(0)
    logits = torch.randn(2 * B, T, V, dtype=torch.float32) * 2
    input_ids = torch.randint(0, V, (2 * B, T))
    completion_mask = torch.zeros(2 * B, T, dtype=torch.long)
    attention_mask = torch.zeros(2 * B, T, dtype=torch.long)
    for i, (p, c, r) in enumerate(LENGTHS):
        input_ids[B + i, :p] = input_ids[i, :p]  # one prompt per pair
        for row, n in ((i, c), (B + i, r)):
            completion_mask[row, p : p + n] = 1
            attention_mask[row, : p + n] = 1
    input_ids[attention_mask == 0] = 0
    # Two chosen tokens are the argmax of the logits before them, so that
    # mean_token_accuracy is not 0.
    for t in (3, 5):
        input_ids[0, t] = logits[0, t - 1].argmax()
    # Reference log-probs from the policy's (TRL's selective_log_softmax, only
    # to place the log-ratios where we want them).
    per_token = selective_log_softmax(logits[:, :-1], input_ids[:, 1:])
    logps = (per_token * completion_mask[:, 1:]).sum(1)
    chosen, rejected = logps.chunk(2)
    ref_chosen = (chosen - torch.tensor(CHOSEN_LOGRATIOS)).float()
    ref_rejected = (rejected - torch.tensor(REJECTED_LOGRATIOS)).float()
    # The two sorts of aot (policy and reference chosen-minus-rejected) must
    # differ, and so must the two of aot_unpaired (chosen and rejected
    # log-ratios), or the sorting would change nothing.
    ident = [0, 1, 2]
    aot = (chosen - rejected).argsort().tolist(), (ref_chosen - ref_rejected).argsort().tolist()
    unpaired = (chosen - ref_chosen).argsort().tolist(), (rejected - ref_rejected).argsort().tolist()
    assert aot[0] != aot[1] and ident not in unpaired, aot
    assert unpaired[0] != unpaired[1], unpaired
    print("aot sorts", aot, "aot_unpaired sorts", unpaired)
    return {
        "logits": logits,
        "input_ids": input_ids,
        "completion_mask": completion_mask,
        "attention_mask": attention_mask,
        "ref_chosen_logps": ref_chosen,
        "ref_rejected_logps": ref_rejected,
    }, {"aot": aot, "aot_unpaired": unpaired}


def field_default(name):
    return DPOConfig.__dataclass_fields__[name].default


def loss_cases():
    cases = []

    def case(name, loss_type, **kw):
        cfg = {
            "loss_type": loss_type,
            "loss_weights": kw.get("loss_weights"),
            "beta": kw.get("beta", 0.1),
            "label_smoothing": kw.get("label_smoothing", field_default("label_smoothing")),
            "f_divergence_type": kw.get("f_divergence_type", field_default("f_divergence_type")),
            "f_alpha_divergence_coef": kw.get("f_alpha_divergence_coef", field_default("f_alpha_divergence_coef")),
            "discopop_tau": kw.get("discopop_tau", field_default("discopop_tau")),
            "use_weighting": kw.get("use_weighting", False),
            "ld_alpha": kw.get("ld_alpha"),
        }
        cases.append((name, cfg))

    for lt in ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
               "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]:
        kw = {}
        if lt == "exo_pair":
            kw["label_smoothing"] = 1e-3
        if lt == "robust":
            kw["label_smoothing"] = 0.1
        if lt == "discopop":
            kw["discopop_tau"] = 0.05
        case(lt, [lt], **kw)
    for lt in ["sigmoid", "ipo", "aot"]:
        case(f"{lt}_beta0.5", [lt], beta=0.5)
    case("sigmoid_forward_kl", ["sigmoid"], f_divergence_type="forward_kl")
    case("sigmoid_js_divergence", ["sigmoid"], f_divergence_type="js_divergence")
    case("sigmoid_alpha_divergence0.5", ["sigmoid"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5)
    case("ipo_alpha_divergence0.3", ["ipo"], f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)
    for lt in ["sigmoid", "ipo", "apo_zero"]:
        case(f"{lt}_weighting", [lt], use_weighting=True)
    case("sigmoid_ld_alpha0.5", ["sigmoid"], ld_alpha=0.5)
    case("sigmoid+sft_weights1.0,0.5", ["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    case("hinge+bco_pair+sft", ["hinge", "bco_pair", "sft"])
    return cases


def fake_self_for(cfg, model):
    accelerator = types.SimpleNamespace(
        device=torch.device("cpu"),
        gather=lambda x: x,
        gather_for_metrics=lambda x: x,
        unwrap_model=lambda m: m,
    )
    return FakeSelf(
        model=model,
        accelerator=accelerator,
        aux_loss_enabled=False,
        precompute_ref_logps=True,
        ld_alpha=cfg["ld_alpha"],
        f_divergence_type=cfg["f_divergence_type"],
        f_alpha_divergence_coef=cfg["f_alpha_divergence_coef"],
        loss_types=list(cfg["loss_type"]),
        loss_weights=list(cfg["loss_weights"] or [1.0] * len(cfg["loss_type"])),
        beta=cfg["beta"],
        label_smoothing=cfg["label_smoothing"],
        use_weighting=cfg["use_weighting"],
        args=types.SimpleNamespace(discopop_tau=cfg["discopop_tau"]),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
    )


def losses(out_dir):
    inputs, sorts = loss_inputs()
    cases = []
    set_attrs = None
    for name, cfg in loss_cases():
        logits = inputs["logits"].clone().requires_grad_(True)
        model = LogitsModel(logits)
        fake = fake_self_for(cfg, model)
        set_attrs = set(vars(fake))
        batch = {k: v for k, v in inputs.items() if k != "logits"}
        loss = DPOTrainer._compute_loss(fake, model, batch, False)
        assert model.kwargs == ["attention_mask", "input_ids", "use_cache"], model.kwargs
        loss.backward()
        grad = logits.grad
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
        # No gradient at the last position or where the completion mask is 0 one step later.
        assert grad[:, -1].abs().sum() == 0
        train = vars(fake)["_metrics"]["train"]
        assert not vars(fake)["_metrics"]["eval"]
        metrics = {}
        for k, v in train.items():
            assert len(v) == 1, (k, v)
            metrics[k] = float(v[0])
        cases.append({"name": name, "config": cfg, "loss": loss.item(), "grad_logits": grad.tolist(),
                      "metrics": metrics})
        print(f"loss {name:28s} {loss.item():.6f}")
    loss_of = {c["name"]: c["loss"] for c in cases}
    assert abs(loss_of["aot"] - loss_of["sigmoid"]) > 1e-4, "aot pairs as sigmoid does"
    unread = set_attrs - READ
    assert not unread, unread
    dump(out_dir / "losses.json", {
        "made_by": made_by(),
        "inputs": {
            "pairs": B,
            "logits": inputs["logits"].tolist(),
            "input_ids": inputs["input_ids"].tolist(),
            "completion_mask": inputs["completion_mask"].tolist(),
            "attention_mask": inputs["attention_mask"].tolist(),
            "ref_chosen_logps": inputs["ref_chosen_logps"].tolist(),
            "ref_rejected_logps": inputs["ref_rejected_logps"].tolist(),
        },
        "cases": cases,
    }, "cases")
    return sorted(READ), sorts


# ---------------------------------------------------------------------------
# 2. policy/ and reference/
# ---------------------------------------------------------------------------

TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"]


def tiny_models(fixtures, out_dir):
    src = Path(fixtures) / "models" / "tiny-llama"
    tok = AutoTokenizer.from_pretrained(src)
    for name, seed in (("policy", 0), ("reference", 1)):
        d = out_dir / name
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        config = LlamaConfig(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            rms_norm_eps=1e-6,
            initializer_range=0.2,
            tie_word_embeddings=False,
            bos_token_id=tok.bos_token_id,
            eos_token_id=tok.eos_token_id,
            pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="eager")
        model.generation_config = GenerationConfig(
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
        )
        model.save_pretrained(d, safe_serialization=True)
        for f in TOKENIZER_FILES:
            if (src / f).exists():
                shutil.copyfile(src / f, d / f)
        size = (d / "model.safetensors").stat().st_size
        print(name, "model.safetensors", size, "bytes")
        assert size < 300_000


# ---------------------------------------------------------------------------
# 3. pairs.jsonl and eval.json
# ---------------------------------------------------------------------------

EVAL_CASES = [
    ("sigmoid", {"loss_type": ["sigmoid"], "beta": 0.1, "label_smoothing": 0.0}),
    ("ipo", {"loss_type": ["ipo"], "beta": 0.1, "label_smoothing": 0.0}),
    ("hinge", {"loss_type": ["hinge"], "beta": 0.1, "label_smoothing": 0.0}),
    ("robust", {"loss_type": ["robust"], "beta": 0.1, "label_smoothing": 0.1}),
    ("sigmoid_beta0.5", {"loss_type": ["sigmoid"], "beta": 0.5, "label_smoothing": 0.0}),
]
TIMING_KEYS = {"eval_runtime", "eval_samples_per_second", "eval_steps_per_second"}


def load_causal(d):
    return AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, attn_implementation="eager")


def evaluation(fixtures, tests, out_dir):
    lines = (Path(fixtures) / "data" / "preferences.jsonl").read_bytes().splitlines(keepends=True)[:10]
    (out_dir / "pairs.jsonl").write_bytes(b"".join(lines))
    rows_in = [json.loads(l) for l in lines]
    policy_dir, ref_dir = out_dir / "policy", out_dir / "reference"
    tok = AutoTokenizer.from_pretrained(policy_dir)
    cases, rows, batch_pairs, notes = [], None, None, []
    for name, cfg in EVAL_CASES:
        with tempfile.TemporaryDirectory() as tmp, Warnings() as w:
            args = DPOConfig(
                output_dir=tmp, bf16=False, fp16=False, use_cpu=True, per_device_eval_batch_size=4,
                per_device_train_batch_size=4, report_to=[], max_length=1024, beta=cfg["beta"],
                loss_type=list(cfg["loss_type"]), label_smoothing=cfg["label_smoothing"],
                dataloader_drop_last=False, seed=42, gradient_checkpointing=False,
            )
            ds = Dataset.from_list(rows_in)
            trainer = DPOTrainer(model=load_causal(policy_dir), ref_model=load_causal(ref_dir), args=args,
                                 train_dataset=ds, eval_dataset=ds, processing_class=tok)
            spy = {"loss": [], "pairs": [], "metrics": None}
            compute_loss = trainer.compute_loss
            log = trainer.log

            def spy_loss(model, inputs, return_outputs=False, num_items_in_batch=None):
                out = compute_loss(model, inputs, return_outputs, num_items_in_batch)
                spy["loss"].append(float(out[0] if return_outputs else out))
                spy["pairs"].append(inputs["input_ids"].shape[0] // 2)
                return out

            def spy_log(logs, start_time=None):
                spy["metrics"] = {k: list(v) for k, v in trainer._metrics["eval"].items()}
                return log(logs, start_time)

            trainer.compute_loss = spy_loss
            trainer.log = spy_log
            result = trainer.evaluate()
            pairs = [len(b["input_ids"]) // 2 for b in trainer.get_eval_dataloader()]
            case_rows = [{k: trainer.eval_dataset[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                         for i in range(len(trainer.eval_dataset))]
        note_warnings(w, f"eval {name}")
        if rows is None:
            rows, batch_pairs = case_rows, pairs
        assert rows == case_rows and pairs == batch_pairs == spy["pairs"] == [4, 4, 2], (pairs, spy["pairs"])
        metrics = {k: float(v) for k, v in result.items() if k not in TIMING_KEYS}
        # How the batches are weighed.
        per_pair = sum(l * n for l, n in zip(spy["loss"], spy["pairs"])) / sum(spy["pairs"])
        per_batch = sum(spy["loss"]) / len(spy["loss"])
        print(f"eval {name}: eval_loss {metrics['eval_loss']:.7f} per-pair mean {per_pair:.7f} "
              f"per-batch mean {per_batch:.7f}")
        assert abs(metrics["eval_loss"] - per_pair) < 1e-6 and abs(per_pair - per_batch) > 1e-5, name
        for k, v in spy["metrics"].items():
            mean = sum(v) / len(v)
            assert abs(metrics[f"eval_{k}"] - mean) < 1e-9, (k, v)
            if k != "num_tokens":
                assert len(v) == 3, (k, v)
        batches = [
            {"pairs": n, "loss": l, "metrics": {k: float(v[i]) for k, v in spy["metrics"].items() if len(v) == 3}}
            for i, (n, l) in enumerate(zip(spy["pairs"], spy["loss"]))
        ]
        cases.append({"name": name, "config": cfg, "metrics": metrics, "batches": batches})
    notes = (
        "eval_loss is the mean over pairs: transformers' evaluation_loop repeats each batch loss "
        "eval_batch_size (4) times and accelerate's gather_for_metrics cuts the last batch's copies to the "
        "dataset remainder (10 % 4 = 2), so the batches of 4, 4 and 2 pairs weigh 4, 4 and 2 "
        "(checked: eval_loss = sum(pairs * loss) / 10, not the mean of the 3 batch losses). Every other "
        "eval_* metric is DPOTrainer.log's plain mean over the 3 batches of what _compute_loss logged per "
        "batch (checked against the per-batch values in 'batches'); eval_num_tokens is 0 because tokens "
        "are only counted in training. Timing keys (eval_runtime, eval_samples_per_second, "
        "eval_steps_per_second) are left out. The reference log-probs come from the reference model on the "
        "fly (precompute_ref_log_probs False)."
    )
    golden = {
        "made_by": dict(made_by(full=True), policy_sha256=sha256(policy_dir / "model.safetensors"),
                        reference_sha256=sha256(ref_dir / "model.safetensors")),
        "policy": f"{tests}/{OUT}/policy",
        "reference": f"{tests}/{OUT}/reference",
        "dataset": f"{tests}/{OUT}/pairs.jsonl",
        "per_device_eval_batch_size": 4,
        "max_length": 1024,
        "eval_batches_pairs": batch_pairs,
        "notes": notes,
        "rows": rows,
        "cases": cases,
    }
    text = json.dumps({k: v for k, v in golden.items() if k not in ("rows", "cases")}, ensure_ascii=False)[:-1]
    text += ', "rows": [\n' + ",\n".join(json.dumps(r) for r in rows) + "\n],\n"
    text += '"cases": [\n' + ",\n".join(json.dumps(c) for c in cases) + "\n]}\n"
    json.loads(text)
    (out_dir / "eval.json").write_text(text)


# ---------------------------------------------------------------------------
# 4. prep.json
# ---------------------------------------------------------------------------


def prepare(rows, tok, max_length, truncation_mode):
    with tempfile.TemporaryDirectory() as tmp, Warnings() as w:
        args = DPOConfig(output_dir=tmp, use_cpu=True, report_to=[], max_length=max_length,
                         truncation_mode=truncation_mode)
        ds = Dataset.from_list([dict(r, _row=i) for i, r in enumerate(rows)])
        prepared = DPOTrainer._prepare_dataset(types.SimpleNamespace(_tokenizer=tok), ds, tok, args, "golden")
        collator = DataCollatorForPreference(pad_token_id=tok.pad_token_id, max_length=max_length,
                                             truncation_mode=truncation_mode)
        out = []
        for ex in prepared:
            batch = collator([{k: ex[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}])
            keep = batch["attention_mask"].bool()
            row = {"index_in_input": ex["_row"]}
            row.update({k: ex[k] for k in ("prompt", "chosen", "rejected", "prompt_ids", "chosen_ids",
                                             "rejected_ids")})
            for j, side in enumerate(("chosen", "rejected")):
                row[f"{side}_input_ids"] = batch["input_ids"][j][keep[j]].tolist()
                row[f"{side}_completion_mask"] = batch["completion_mask"][j][keep[j]].tolist()
            out.append(row)
    return out, w


def prep(fixtures, tests, out_dir):
    prefs = [json.loads(l) for l in (Path(fixtures) / "data" / "preferences.jsonl").read_text().splitlines()]
    chats = [json.loads(l) for l in (Path(fixtures) / "data" / "chat-preferences.jsonl").read_text().splitlines()]
    policy_dir = out_dir / "policy"
    tok = AutoTokenizer.from_pretrained(policy_dir)
    chat_dir = Path(fixtures) / "models" / "tiny-chat"
    chat_tok = AutoTokenizer.from_pretrained(chat_dir)
    eos = tok.eos_token
    normal = [dict(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"]) for r in prefs[:4]]
    text = normal + [
        dict(prompt=prefs[5]["prompt"], chosen=prefs[5]["chosen"] + eos, rejected=prefs[5]["rejected"]),
        dict(prompt=prefs[9]["prompt"], chosen=prefs[9]["chosen"], rejected=prefs[9]["chosen"]),
        dict(prompt=prefs[6]["prompt"], chosen="", rejected=prefs[6]["rejected"]),
    ]
    implicit = [dict(chosen=r["prompt"] + r["chosen"], rejected=r["prompt"] + r["rejected"]) for r in normal]
    chat = [dict(prompt=r["prompt"], chosen=r["chosen"], rejected=r["rejected"]) for r in chats[:3]]
    chat_implicit = [dict(chosen=r["prompt"] + r["chosen"], rejected=r["prompt"] + r["rejected"]) for r in chat]
    short = 6
    specs = [
        ("text", text, tok, policy_dir, 1024, "keep_start"),
        ("implicit", implicit, tok, policy_dir, 1024, "keep_start"),
        ("keep_start_short", text, tok, policy_dir, short, "keep_start"),
        ("keep_end_short", text, tok, policy_dir, short, "keep_end"),
        ("chat", chat, chat_tok, chat_dir, 1024, "keep_start"),
        ("chat_implicit", chat_implicit, chat_tok, chat_dir, 1024, "keep_start"),
    ]
    cases = []
    for name, rows, tk, tk_dir, max_length, mode in specs:
        out, w = prepare(rows, tk, max_length, mode)
        note_warnings(w, f"prep {name}")
        case = {"name": name, "tokenizer": str(tk_dir) if tk_dir is chat_dir else f"{tests}/{OUT}/policy",
                "pad_token_id": tk.pad_token_id, "eos_token": tk.eos_token, "max_length": max_length,
                "truncation_mode": mode, "input_rows": rows, "rows_kept": len(out), "rows": out,
                "warnings": w.distinct()}
        if name.endswith("implicit"):
            case["extracted"] = [extract_prompt(r) for r in rows]
        cases.append(case)
        lens = [(len(r["prompt_ids"]), len(r["chosen_ids"]), len(r["rejected_ids"])) for r in out]
        print(f"prep {name}: kept {len(out)}/{len(rows)}, (prompt, chosen, rejected) lengths {lens}")
    by = {c["name"]: c for c in cases}
    # keep_start_short: some prompt alone fills max_length (dropped), others are cut.
    s = by["keep_start_short"]
    assert s["rows_kept"] < len(text), s["rows_kept"]
    assert any(len(r["chosen_input_ids"]) < len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in s["rows"])
    assert by["keep_end_short"]["rows_kept"] == len(text)
    dropped = sorted(set(range(len(text))) - {r["index_in_input"] for r in s["rows"]})
    print("keep_start_short dropped rows", dropped)
    golden = {"made_by": made_by(full=True), "cases": cases}
    t = json.dumps({"made_by": golden["made_by"]}, ensure_ascii=False)[:-1] + ', "cases": [\n'
    t += ",\n".join(json.dumps(c, ensure_ascii=False) for c in cases) + "\n]}\n"
    json.loads(t)
    (out_dir / "prep.json").write_text(t)


def main(fixtures, tests):
    out_dir = Path(tests) / OUT
    out_dir.mkdir(parents=True, exist_ok=True)
    read, sorts = losses(out_dir)
    print("fake_self attributes read by _compute_loss:", read)
    tiny_models(fixtures, out_dir)
    evaluation(fixtures, tests, out_dir)
    prep(fixtures, tests, out_dir)
    print("tok('overall the movie was') adds BOS:",
          AutoTokenizer.from_pretrained(out_dir / "policy")("overall the movie was")["input_ids"][:1] == [0])
    print("warnings seen (where, message, count):")
    for (where, m), n in ALL_WARNINGS.items():
        print(f"  [{where}] x{n}: {m[:300]}")
    for f in sorted(out_dir.rglob("*")):
        if f.is_file():
            print(f"{f}: {f.stat().st_size} bytes")


if __name__ == "__main__":
    main(*sys.argv[1:3])
