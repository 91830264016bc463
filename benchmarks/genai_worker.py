"""onnxruntime-genai baseline worker (runs in the genai venv, see setup_genai.sh).

Imports only onnxruntime_genai / onnxruntime / numpy, never the compressor
package or torch. Request: one JSON object on stdin (or argv[1]: a JSON string
or @path); result: one JSON object on stdout.

  {"cmd": "decode", "model": DIR, "prompts": [[ids...], ...], "new_tokens": 64,
   "threads": 2, "ignore_eos": true}
      Greedy og.Generator run per prompt (after one warm-up generation).
      prefill_ms = append_tokens(prompt) [runs the model over the prompt]
                   + the first generate_next_token() [argmax of those logits,
                   no model run] -> time to the first new token.
      decode_tok_s = (new_tokens - 1) / time of the remaining
                   generate_next_token() calls (each = one model step on the
                   previous token + argmax).
      ignore_eos sets min_length = prompt + new_tokens so exactly new_tokens come
      out (genai masks EOS until then); generated ids are returned.
  {"cmd": "perplexity", "model": DIR, "windows": [[ids]*512, ...] | "windows_file": X.npy}
      onnxruntime InferenceSession on DIR/model.onnx (the graph genai runs):
      input_ids [1,L], attention_mask ones [1,L], empty past KV (length 0).
      ppl = exp(mean NLL of tokens 1..L-1 over all windows), float64 log-softmax.
  {"cmd": "prefill", "model": DIR, "prompt": [ids] | "prompts": [[ids]],
   "lengths": [128, 512], "runs": 5}
      Fresh generator per run, times append_tokens of the first L ids
      (after one warm-up run); min / median ms per length.

Threads: the intra-op thread count reaches genai through og.Config.overlay(),
which patches model.decoder.session_options.intra_op_num_threads of
genai_config.json in memory (inter_op_num_threads = 1).
"""
import json
import sys
import time

import numpy as np
import onnxruntime as ort
import onnxruntime_genai as og
from worker_common import peak_rss_mb, read_request, time_prompts, token_lists

MIN_MAX_LENGTH = 0




def load_model(path, threads):
    # genai sizes the sliding-window KV ring as min(max_length, window); ORT 1.32's
    # GQA (sliding_window_cache=1) rejects capacity < local_window_size, so
    # _generator raises max_length to the window (generation still stops at new_tokens).
    sw = json.load(open(f"{path}/genai_config.json"))["model"]["decoder"].get("sliding_window") or {}
    global MIN_MAX_LENGTH
    MIN_MAX_LENGTH = sw.get("window_size", 0) + sw.get("cache_slack", 0)
    config = og.Config(path)
    config.clear_providers()  # CPU
    so = {"intra_op_num_threads": int(threads), "inter_op_num_threads": 1}
    config.overlay(json.dumps({"model": {"decoder": {"session_options": so}}}))
    return og.Model(config)


def _generator(model, prompt_len, new_tokens, ignore_eos):
    params = og.GeneratorParams(model)
    total = prompt_len + new_tokens
    opts = {"do_sample": False, "max_length": max(total, MIN_MAX_LENGTH), "num_beams": 1}
    if ignore_eos:
        opts["min_length"] = total
    params.set_search_options(**opts)
    return og.Generator(model, params)


def generate(model, prompt, new_tokens, ignore_eos=True):
    gen = _generator(model, len(prompt), new_tokens, ignore_eos)
    t0 = time.perf_counter()
    gen.append_tokens(prompt)
    gen.generate_next_token()
    t1 = time.perf_counter()
    n = 1
    while n < new_tokens and not gen.is_done():
        gen.generate_next_token()
        n += 1
    t2 = time.perf_counter()
    out = [int(t) for t in gen.get_sequence(0)[len(prompt):]]
    return out, t1 - t0, t2 - t1


def cmd_decode(req):
    model = load_model(req["model"], req.get("threads", 2))
    prompts = token_lists(req, "prompts", np.int32)
    new = int(req.get("new_tokens", 64))
    ignore_eos = bool(req.get("ignore_eos", True))
    out = time_prompts(lambda p, n: generate(model, p, n, ignore_eos), prompts, new)
    return {"cmd": "decode", "model": req["model"], "new_tokens": new, **out}


def cmd_prefill(req):
    model = load_model(req["model"], req.get("threads", 2))
    prompt = token_lists(req, "prompts", np.int32)[0] if ("prompts" in req or "prompts_file" in req) \
        else np.asarray(req["prompt"], dtype=np.int32)
    n_runs = int(req.get("runs", 5))
    res = {}
    for L in req.get("lengths", [128, 512]):
        assert len(prompt) >= L, f"prompt has {len(prompt)} ids < {L}"
        ms = []
        for i in range(n_runs + 1):  # first run = warm-up
            gen = _generator(model, L, 1, False)
            t0 = time.perf_counter()
            gen.append_tokens(prompt[:L])
            dt = 1e3 * (time.perf_counter() - t0)
            if i:
                ms.append(dt)
            del gen
        res[str(L)] = {"min_ms": min(ms), "median_ms": float(np.median(ms)), "runs_ms": ms}
    return {"cmd": "prefill", "model": req["model"], "prefill": res}


def cmd_perplexity(req):
    mdir = req["model"]
    cfg = json.load(open(f"{mdir}/genai_config.json"))["model"]["decoder"]
    so = ort.SessionOptions()
    so.intra_op_num_threads = int(req.get("threads", 2))
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(f"{mdir}/{cfg['filename']}", so, providers=["CPUExecutionProvider"])
    windows = token_lists(req, "windows", np.int32)
    sw = cfg.get("sliding_window") or {}
    window = sw.get("window_size", 0) + sw.get("cache_slack", 0)
    nll_sum, count, per_window = 0.0, 0, []
    t0 = time.perf_counter()
    for w in windows:
        ids = w.astype(np.int64)[None, :]
        feed = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for inp in sess.get_inputs():
            if inp.name.startswith("past_key_values."):  # [B, kv_heads, past, head]
                # Sliding-window layers (GQA sliding_window_cache=1, Gemma 3) take a
                # fixed-capacity ring buffer: window_size + cache_slack slots, as genai
                # allocates; the mask (0 past) says none are valid. Others: length 0.
                past = window if inp.shape[2] == "past_sliding_length" else 0
                shape = [1, inp.shape[1], past, cfg["head_size"]]
                feed[inp.name] = np.zeros(shape, dtype=np.float32)
        logits = sess.run(["logits"], feed)[0][0]  # [L, V]
        w_nll = 0.0
        for s in range(0, len(w) - 1, 64):  # float64 log-softmax in row chunks
            x = logits[s:min(s + 64, len(w) - 1)].astype(np.float64)
            m = x.max(axis=1, keepdims=True)
            lse = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
            tgt = w[s + 1:s + 1 + len(x)]
            w_nll += float((lse - x[np.arange(len(x)), tgt]).sum())
        per_window.append(float(np.exp(w_nll / (len(w) - 1))))
        nll_sum += w_nll
        count += len(w) - 1
    return {"cmd": "perplexity", "model": mdir, "windows": len(windows), "tokens": count,
            "mean_nll": nll_sum / count, "perplexity": float(np.exp(nll_sum / count)),
            "per_window_ppl": per_window, "seconds": time.perf_counter() - t0}


def main():
    req = read_request()
    fn = {"decode": cmd_decode, "prefill": cmd_prefill, "perplexity": cmd_perplexity}[req["cmd"]]
    out = fn(req)
    out["peak_rss_mb"] = peak_rss_mb()  # this process: model + run
    json.dump(out, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
