"""Throughput and memory of ``data_pipeline prepare``; prints one JSON object.

    python benchmarks/bench_prepare.py                      # 200k generated records, Llama 2 + byte-level BPE
    python benchmarks/bench_prepare.py --quick              # 500 records (what the test runs)
    python benchmarks/bench_prepare.py --tokenizers "" --rss-records 5000000   # only the 5M-record memory run
    python benchmarks/bench_prepare.py --records 100000 --code /work/main --skip-baseline   # another checkout

Measured per tokenizer, on the same generated corpus (mixed Chinese/English multi-turn ``messages`` records with
BELLE-like lengths):

- ``raw_tokenizer_1core`` / ``raw_tokenizer_2cores_rayon``: the Rust tokenizer's ``encode_batch_fast`` on every
  message text, on 1 core (one thread) and on 2 cores with its own rayon pool (tokens/s);
- ``prepare_w1_1core`` / ``prepare_w1`` / ``prepare_w2``: ``prepare`` end to end (read, template, tokenize, mask,
  split, pack at --max-seq-len, write shards + manifest) with 1 worker on 1 core, 1 worker on 2 cores (its two
  block threads) and 2 workers on 2 cores (tokens/s, peak RSS of main and workers);
- ``datasets_map_{typical,batched}_np{1,2}``: the same job with ``datasets.load_dataset("json")`` +
  ``.map(batched=True, num_proc=N)`` + ``save_to_disk`` on N cores, the same template text and masks; "typical"
  calls the tokenizer per message segment per example (as LLaMA-Factory does), "batched" once per map batch;
- ``profile_1core``: CPU-seconds per stage of a 1-worker run (benchmarks/profile_prepare.py);
- ``real_samples``: ``prepare`` on the real corpus samples in tests/fixtures/real (every format reader);
- ``rss_small`` / ``rss_run`` (``--rss-records N``): ``--workers 2`` on N/50 and N short records written to a
  temporary directory: peak memory that does not grow with the corpus.

Start-up is timed on both sides (imports and tokenizer loading). Peak RSS is each process's own VmHWM (the job's,
and each worker's sampled from /proc), never ``ru_maxrss``, which a forked worker inherits from its parent.
``--write FILE`` also saves the report (benchmarks/results/); each row carries the 1-minute load after it.

Every measurement runs in a fresh child process pinned to the cores it is given (sched_setaffinity); ratios
compare equal cores, except ``w1_vs_raw_1core`` and ``w2_vs_w1``, which are labelled by what they compare.
Tokens are counted the same way everywhere (ids written).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CODE = Path(os.environ.get("BENCH_PREPARE_CODE", REPO))
"""The checkout whose ``prepare`` is measured: this one, or another (``--code``, the before measurement)."""
sys.path.insert(0, str(CODE))
from sft_stack.common.memory import peak_rss_mib  # noqa: E402  (after the checkout is on the path)

REAL = REPO / "tests" / "fixtures" / "real"
TOKENIZERS = {
    "llama2": REPO / "tests" / "fixtures" / "tokenizers" / "llama2_sentencepiece",
    "bpe": REPO / "tests" / "fixtures" / "tokenizers" / "tiny_bpe",
}
MAX_SEQ_LEN = 2048

# Frequent Chinese characters and English words: text whose token statistics resemble real SFT corpora.
_ZH = (
    "的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心"
    "多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外"
    "但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电"
    "四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性"
)
_EN = (  # noqa: SIM905  (a list literal is one line per word once formatted)
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by "
    "word but not what all were we when your can said there use an each which she do how their if will up other "
    "about out many then them these so some her would make like him into time has look two more write go see "
    "number no way could people my than first water been call who oil its now find long down day did get come "
    "made may part model data train answer "
).split()


def _sentence(rng: random.Random, chars: int, lang: str) -> str:
    if lang == "zh":
        return "".join(rng.choices(_ZH, k=chars)) + "。"
    words = rng.choices(_EN, k=max(1, chars // 5))
    return " ".join(words).capitalize() + "."


def _text(rng: random.Random, chars: int, lang: str) -> str:
    parts, left = [], chars
    while left > 0:
        n = min(left, rng.randint(10, 60))
        parts.append(_sentence(rng, n, lang if lang != "mixed" else rng.choice(("zh", "en"))))
        left -= n
    return "".join(parts) if lang == "zh" else " ".join(parts)


def generate_corpus(path: Path, records: int, seed: int = 0) -> None:
    """Write ``records`` JSON lines of ``messages`` conversations: 1-3 turns, BELLE-like log-normal lengths."""
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as handle:
        for _ in range(records):
            lang = rng.choices(("zh", "en", "mixed"), weights=(5, 4, 1))[0]
            messages = []
            if rng.random() < 0.1:
                messages.append({"role": "system", "content": _text(rng, 40, lang)})
            for _turn in range(rng.choices((1, 2, 3), weights=(6, 3, 1))[0]):
                messages.append(
                    {"role": "user", "content": _text(rng, int(min(1500, rng.lognormvariate(4.0, 0.8))), lang)}
                )
                answer = int(min(3000, rng.lognormvariate(5.0, 0.9)))
                messages.append({"role": "assistant", "content": _text(rng, answer, lang)})
            handle.write(json.dumps({"messages": messages}, ensure_ascii=False) + "\n")


def generate_short_corpus(path: Path, records: int) -> None:
    """Write ``records`` short one-turn ``messages`` records (about 150 bytes each), fast: the many-records corpus
    of the memory run, where the record count, not the text, is what grows."""
    with path.open("w", encoding="utf-8") as handle:
        for start in range(0, records, 10_000):
            handle.write(
                "".join(
                    f'{{"messages": [{{"role": "user", "content": "问题 {i}: what is {i % 97} + {i % 89}?"}}, '
                    f'{{"role": "assistant", "content": "{i % 97} + {i % 89} = {i % 97 + i % 89}。答案是 {i}."}}]}}\n'
                    for i in range(start, min(start + 10_000, records))
                )
            )


def fast_tokenizer_dir(name: str, work: Path) -> Path:
    """A directory with tokenizer.json: the Llama 2 SentencePiece model is converted to fast once, here."""
    source = TOKENIZERS[name]
    if (source / "tokenizer.json").is_file():
        return source
    from transformers import LlamaTokenizerFast

    target = work / f"tokenizer_{name}"
    LlamaTokenizerFast.from_pretrained(str(source)).save_pretrained(str(target))
    return target


# ------------------------------------------------------------------------------------------ child jobs


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and of its finished children (the worker processes)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def _rates(tokens: int, seconds: float, cpu: float) -> dict[str, float]:
    """Wall-clock and CPU-time rates: on a shared machine, tokens per CPU-second is the contention-proof one."""
    return {
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "cpu_s": round(cpu, 3),
        "tokens_per_s": round(tokens / seconds),
        "tokens_per_cpu_s": round(tokens / cpu),
    }


class _ChildPeaks(threading.Thread):
    """The peak RSS of every child process (the pool's workers) while the job runs: each child's VmHWM, sampled.

    ``getrusage(RUSAGE_CHILDREN).ru_maxrss`` would report this process's own peak for a forked child (Linux keeps
    the parent's resident set across fork), so each worker's own high-water mark is read from /proc instead."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peaks: dict[int, float] = {}
        self._done = threading.Event()

    def run(self) -> None:
        while not self._done.wait(0.05):
            for children in Path("/proc/self/task").glob("*/children"):
                for pid in children.read_text().split():
                    try:
                        status = Path(f"/proc/{pid}/status").read_text()
                    except OSError:
                        continue
                    for line in status.splitlines():
                        if line.startswith("VmHWM:"):
                            self.peaks[int(pid)] = max(self.peaks.get(int(pid), 0.0), int(line.split()[1]) / 1024)

    def stop(self) -> dict[str, Any]:
        self._done.set()
        self.join()
        return {
            "peak_rss_main_mb": round(peak_rss_mib(), 1),
            "peak_rss_worker_mb": round(max(self.peaks.values(), default=0.0), 1),
            "peak_rss_workers_mb": sorted(round(v, 1) for v in self.peaks.values()),
        }


def job_raw(corpus: Path, tokenizer_dir: Path) -> dict[str, Any]:
    """The Rust tokenizer's batch encode on every message text, with the threads TOKENIZERS_PARALLELISM allows."""
    texts = []
    with corpus.open(encoding="utf-8") as handle:
        for line in handle:
            texts.extend(m["content"] for m in json.loads(line)["messages"])
    # Start-up included, as for prepare: importing tokenizers and loading tokenizer.json count.
    start, cpu = time.perf_counter(), _cpu_seconds()
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokens = 0
    for i in range(0, len(texts), 1024):
        tokens += sum(len(e.ids) for e in tokenizer.encode_batch_fast(texts[i : i + 1024], add_special_tokens=False))
    return {**_rates(tokens, time.perf_counter() - start, _cpu_seconds() - cpu), "peak_rss_main_mb": peak_rss_mib()}


def job_prepare(sources: list[str], tokenizer_dir: Path, out: Path, workers: int) -> dict[str, Any]:
    """prepare end to end, start-up (importing data_pipeline, loading the tokenizer) included."""
    start, cpu = time.perf_counter(), _cpu_seconds()
    children = _ChildPeaks()
    children.start()
    from data_pipeline.prepare import PrepareOptions, SourceSpec, prepare

    options = PrepareOptions(
        sources=tuple(SourceSpec(path=s) for s in sources),
        tokenizer=str(tokenizer_dir),
        out=str(out),
        template="default",
        max_seq_len=MAX_SEQ_LEN,
        pack=True,
        val_fraction=0.01,
        max_bad_fraction=1.0,
        max_dropped_fraction=1.0,
        workers=workers,
        progress=False,
    )
    manifest = prepare(options)
    seconds = time.perf_counter() - start
    return {
        "records": manifest.counts["samples_read"],
        "rejected": manifest.counts["samples_rejected"],
        **_rates(manifest.counts["tokens"], seconds, _cpu_seconds() - cpu),
        "records_per_s": round(manifest.counts["samples_read"] / seconds),
        "packing_efficiency": manifest.packing_efficiency,
        "shards": sum(len(s.shards) for s in manifest.splits.values()),
        **children.stop(),
    }


def job_baseline(corpus: Path, tokenizer_dir: Path, out: Path, num_proc: int, style: str) -> dict[str, Any]:
    """load_dataset("json") + map(batched=True, num_proc) + save_to_disk, with the same template text and masks.

    style "typical": the map function loops over examples and calls the tokenizer once per message segment,
    concatenating ids and labels per example, as LLaMA-Factory's supervised preprocessing and most SFT scripts
    do. style "batched": one batched tokenizer call per map batch (what our encoder does), a stronger baseline.
    Neither packs, splits off val, or checks and reports rejects, which prepare does.
    """
    start, cpu = time.perf_counter(), _cpu_seconds()
    children = _ChildPeaks()
    children.start()
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id

    def segments(messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
        """The default template's text pieces of one conversation, each with whether it is trained."""
        pieces = []
        for i, m in enumerate(messages):
            if m["role"] == "system":
                pieces.append((m["content"] + "\n\n", False))
            elif m["role"] == "user":
                sep = "\n\n" if i > 0 and messages[i - 1]["role"] == "assistant" else ""
                pieces.append((f"{sep}### User:\n{m['content']}\n\n### Assistant:\n", False))
            else:
                pieces.append((m["content"], True))
        return pieces

    def encode_typical(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        model_inputs: dict[str, list[list[int]]] = {"input_ids": [], "labels": [], "position_ids": []}
        for messages in batch["messages"]:
            input_ids, labels = [bos], [-100]
            for text, trained in segments(messages):
                ids = tokenizer.encode(text, add_special_tokens=False)
                if trained:
                    input_ids += [*ids, eos]
                    labels += [*ids, eos]
                else:
                    input_ids += ids
                    labels += [-100] * len(ids)
            model_inputs["input_ids"].append(input_ids[:MAX_SEQ_LEN])
            model_inputs["labels"].append(labels[:MAX_SEQ_LEN])
            model_inputs["position_ids"].append(list(range(len(model_inputs["input_ids"][-1]))))
        return model_inputs

    def encode_batched(batch: dict[str, list[Any]]) -> dict[str, list[list[int]]]:
        texts, roles, owners = [], [], []
        for row, messages in enumerate(batch["messages"]):
            for i, m in enumerate(messages):
                if m["role"] == "system":
                    texts.append(m["content"] + "\n\n")
                elif m["role"] == "user":
                    sep = "\n\n" if i > 0 and messages[i - 1]["role"] == "assistant" else ""
                    texts.append(f"{sep}### User:\n{m['content']}\n\n### Assistant:\n")
                else:
                    texts.append(m["content"])
                roles.append(m["role"])
                owners.append(row)
        pieces = tokenizer(texts, add_special_tokens=False)["input_ids"]
        ids: list[list[int]] = [[bos] for _ in batch["messages"]]
        labels: list[list[int]] = [[-100] for _ in batch["messages"]]
        for piece, role, row in zip(pieces, roles, owners, strict=True):
            if role == "assistant":
                ids[row] += [*piece, eos]
                labels[row] += [*piece, eos]
            else:
                ids[row] += piece
                labels[row] += [-100] * len(piece)
        ids = [x[:MAX_SEQ_LEN] for x in ids]
        labels = [x[:MAX_SEQ_LEN] for x in labels]
        return {"input_ids": ids, "labels": labels, "position_ids": [list(range(len(x))) for x in ids]}

    raw = datasets.load_dataset("json", data_files=str(corpus), split="train", cache_dir=str(out / "cache"))
    encode = encode_typical if style == "typical" else encode_batched
    mapped = raw.map(encode, batched=True, num_proc=num_proc if num_proc > 1 else None, remove_columns=raw.column_names)
    mapped.save_to_disk(str(out / "saved"))
    seconds, cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    tokens = sum(len(x) for batch in mapped.iter(batch_size=10_000) for x in batch["input_ids"])
    return {**_rates(tokens, seconds, cpu), **children.stop()}


def job_profile(corpus: Path, tokenizer_dir: Path, out: Path) -> dict[str, Any]:
    """CPU seconds per stage of prepare with one worker on one core (benchmarks/profile_prepare.py)."""
    from profile_prepare import profile  # this script's folder is on sys.path

    return profile(corpus, tokenizer_dir, out, "default", MAX_SEQ_LEN)


def run_child(job: str, *, cores: int = 2, rayon: bool = False, **kwargs: Any) -> dict[str, Any]:
    """Run one job in a fresh interpreter (clean RSS, no warm caches shared between measurements).

    cores: CPUs the job (and its workers) may run on (taskset-style affinity); rayon: let the Rust tokenizer
    use its own thread pool (TOKENIZERS_PARALLELISM=true; prepare itself always sets it to false)."""
    env = {
        **os.environ,
        "TOKENIZERS_PARALLELISM": "true" if rayon else "false",
        "PYTHONPATH": str(CODE),
        "SFT_TRACKING": "0",
    }
    payload = json.dumps(
        {
            "job": job,
            "cores": cores,
            "kwargs": {k: str(v) if isinstance(v, Path) else v for k, v in kwargs.items()},
        }
    )
    result = subprocess.run(
        [sys.executable, __file__, "--child", payload], env=env, capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise SystemExit(f"bench_prepare: child {job} failed:\n{result.stderr[-3000:]}")
    return {**json.loads(result.stdout.strip().splitlines()[-1]), "load_avg_1m_after": round(os.getloadavg()[0], 2)}


def _child_main(payload: str) -> None:
    spec = json.loads(payload)
    available = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, available[: spec["cores"]])
    kwargs = spec["kwargs"]
    for key in ("corpus", "tokenizer_dir", "out"):
        if key in kwargs:
            kwargs[key] = Path(kwargs[key])
    jobs = {"raw": job_raw, "prepare": job_prepare, "baseline": job_baseline, "profile": job_profile}
    print(json.dumps(jobs[spec["job"]](**kwargs)))


# ------------------------------------------------------------------------------------------------ main


def ratio(result: dict[str, Any], a: str, b: str) -> float:
    """tokens/s of measurement a over measurement b."""
    return round(result[a]["tokens_per_s"] / result[b]["tokens_per_s"], 3)


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "load_avg_1m_at_start": round(load[0], 2),
    }


REAL_SAMPLES = [
    str(REAL / "belle" / "Belle_open_source_1k.json"),
    str(REAL / "alpaca" / "alpaca_en_demo.json"),
    str(REAL / "firefly_moss_flat" / "dummy_data.jsonl"),
    str(REAL / "moss_003"),
]
"""The committed real corpora, prepared once per tokenizer as the small real-data row."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 records: a smoke run")
    parser.add_argument("--records", type=int, default=200_000, help="generated records (default 200k)")
    parser.add_argument("--tokenizers", default="llama2,bpe", help="comma list of: llama2, bpe")
    parser.add_argument("--rss-records", type=int, default=0, help="also run prepare (2 workers) on this many records")
    parser.add_argument(
        "--rss-tokenizer", default="llama2", choices=sorted(TOKENIZERS), help="tokenizer of the RSS run"
    )
    parser.add_argument("--skip-baseline", action="store_true", help="skip the datasets.map baseline")
    parser.add_argument("--write", type=Path, help="also write the JSON report to this file (benchmarks/results/...)")
    parser.add_argument("--code", type=Path, help="measure the prepare of this checkout (e.g. main, for before/after)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    return parser


def measure_tokenizer(name: str, corpus: Path, work: Path, *, baseline: bool) -> dict[str, Any]:
    """Every row for one tokenizer: the raw tokenizer, prepare at 1 and 2 workers, the datasets.map baseline
    (unless skipped), the per-stage profile, the real samples, and the ratios the issue asks for."""
    tok = fast_tokenizer_dir(name, work)
    result: dict[str, Any] = {
        "raw_tokenizer_1core": run_child("raw", cores=1, corpus=corpus, tokenizer_dir=tok),
        "raw_tokenizer_2cores_rayon": run_child("raw", rayon=True, corpus=corpus, tokenizer_dir=tok),
    }
    for label, workers, cores in (("prepare_w1_1core", 1, 1), ("prepare_w1", 1, 2), ("prepare_w2", 2, 2)):
        out = work / f"{name}_{label}"
        result[label] = run_child(
            "prepare", cores=cores, sources=[str(corpus)], tokenizer_dir=tok, out=out, workers=workers
        )
        shutil.rmtree(out)
    styles = ("typical", "batched") if baseline else ()
    for style in styles:
        for num_proc in (1, 2):
            out = work / f"{name}_{style}{num_proc}"
            result[f"datasets_map_{style}_np{num_proc}"] = run_child(
                "baseline", cores=num_proc, corpus=corpus, tokenizer_dir=tok, out=out, num_proc=num_proc, style=style
            )
            shutil.rmtree(out)
    result["profile_1core"] = run_child("profile", cores=1, corpus=corpus, tokenizer_dir=tok, out=work / "prof")
    result["real_samples"] = run_child("prepare", sources=REAL_SAMPLES, tokenizer_dir=tok, out=work / "real", workers=1)
    shutil.rmtree(work / "real")
    ratios = {
        # Like with like: one core each, then two cores each (prepare's 2 threads vs rayon's 2 threads).
        "w1_1core_vs_raw_1core": ratio(result, "prepare_w1_1core", "raw_tokenizer_1core"),
        "w1_vs_raw_2cores_rayon": ratio(result, "prepare_w1", "raw_tokenizer_2cores_rayon"),
        "w1_vs_raw_1core": ratio(result, "prepare_w1", "raw_tokenizer_1core"),
        "w2_vs_w1_1core": ratio(result, "prepare_w2", "prepare_w1_1core"),
        "w2_vs_w1": ratio(result, "prepare_w2", "prepare_w1"),
    }
    for style in styles:
        ratios[f"w1_1core_vs_datasets_map_{style}_np1"] = ratio(result, "prepare_w1_1core", f"datasets_map_{style}_np1")
        ratios[f"w2_vs_datasets_map_{style}_np2"] = ratio(result, "prepare_w2", f"datasets_map_{style}_np2")
    result["ratios"] = ratios
    return result


def measure_memory(records: int, tokenizer: str, work: Path) -> dict[str, Any]:
    """The same short records at 1/50 and at full size, 2 workers: a bounded pipeline has the same peaks at both."""
    tok = fast_tokenizer_dir(tokenizer, work)
    rows: dict[str, Any] = {}
    for label, count in (("rss_small", max(1, records // 50)), ("rss_run", records)):
        big = work / "big.jsonl"
        generate_short_corpus(big, count)
        run = run_child("prepare", sources=[str(big)], tokenizer_dir=tok, out=work / "big", workers=2)
        rows[label] = {**run, "corpus_bytes": big.stat().st_size}
        shutil.rmtree(work / "big")
        big.unlink()
    return rows


def main() -> None:
    args = build_parser().parse_args()
    if args.code:
        os.environ["BENCH_PREPARE_CODE"] = str(args.code.resolve())
        global CODE
        CODE = args.code.resolve()
    if args.child:
        _child_main(args.child)
        return
    records = 500 if args.quick else args.records
    work = Path(tempfile.mkdtemp(prefix="bench_prepare_"))
    report: dict[str, Any] = {
        "machine": machine(),
        "code": str(CODE),
        "records": records,
        "max_seq_len": MAX_SEQ_LEN,
        "tokenizers": {},
    }
    try:
        corpus = work / "corpus.jsonl"
        start = time.perf_counter()
        generate_corpus(corpus, records)
        report["corpus"] = {"path_bytes": corpus.stat().st_size, "generate_s": round(time.perf_counter() - start, 1)}
        for name in [n for n in args.tokenizers.split(",") if n]:
            report["tokenizers"][name] = measure_tokenizer(name, corpus, work, baseline=not args.skip_baseline)
        if args.rss_records:
            report |= measure_memory(args.rss_records, args.rss_tokenizer, work)
        report["machine"]["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))
    if args.write:
        args.write.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
