"""The report card: one self-contained HTML page (inline CSS and images, no script, no URL)."""

from __future__ import annotations

import base64
import html
from datetime import datetime, timezone
from pathlib import Path

from privdiff import __version__
from privdiff.metrics.estimate import format_estimate
from privdiff.report import plots
from privdiff.report.verdict import (
    CAUGHT_NULL_SD,
    CHANCE_NULL_SD,
    guarantee_text,
    verdict,
)
from privdiff.split.attacks.grid import (
    attacks_in,
    grid_figure,
    reference_ssim,
    utility_cell,
    worst_client,
)
from privdiff.weights.plots import weights_defence_curve

STYLE = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:2em auto;max-width:1200px;color:#222;
background:#fff;padding:0 1em}
img{max-width:100%;height:auto}
h1{font-size:1.6em;margin-bottom:.2em}h2{font-size:1.2em;border-bottom:1px solid #ddd;padding-bottom:.2em;
margin-top:1.8em}
table{border-collapse:collapse;font-size:.88em;margin:.6em 0}th,td{border:1px solid #ddd;padding:.3em .6em;
text-align:left;vertical-align:top}th{background:#f3f5f7}td.num{text-align:right;font-variant-numeric:tabular-nums}
.ci{color:#666;font-size:.9em}.muted{color:#666;font-size:.85em}.grid{display:flex;flex-wrap:wrap;gap:1.2em}
.card{border:1px solid #e3e3e3;border-radius:6px;padding:.6em}.card img{image-rendering:pixelated;max-width:480px}
.dp{color:#0a6;font-weight:600}.nodp{color:#b50}
ul.verdicts{font-size:1.05em;line-height:1.6}.caught{color:#b00;font-weight:600}.chance{color:#0a6;font-weight:600}
"""

# The headline's x axis: the first of these that an evaluated run has (its interval is plotted too).
UTILITY_MEASURES = (("heldout_loss/nonmember_test", "held-out denoising loss on test non-members (lower is better)"),
                    ("kid/members", "KID against the members (lower is better)"),
                    ("fid/members", "FID against the members (lower is better)"))


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def fmt(value: float | None) -> str:
    if value is None:
        return "–"
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:.3e}"


def _img(data: bytes, alt: str) -> str:
    return f'<img alt="{_e(alt)}" src="data:image/png;base64,{base64.b64encode(data).decode()}">'


def _privacy_cell(privacy: dict) -> str:
    if not privacy or privacy.get("epsilon") is None:
        return '<span class="nodp">no formal guarantee</span>'
    return (f'<span class="dp">ε = {fmt(privacy["epsilon"])}, δ = {fmt(privacy.get("delta"))}</span>'
            f'<br><span class="muted">{_e(privacy.get("accountant", "").upper())} (PLD cross-check '
            f'{fmt(privacy.get("epsilon_pld"))}); σ = {fmt(privacy.get("noise_multiplier"))}, '
            f'C = {fmt(privacy.get("max_grad_norm"))}, K = {privacy.get("noise_multiplicity")}, '
            f'q = {fmt(privacy.get("sample_rate"))}, {privacy.get("steps")} steps; per example, '
            f'add/remove. Training curves are not covered.'
            + (f' Accountant: {_e(privacy["accountant_note"])}.' if privacy.get("accountant_note") else "")
            + '</span>')


def _training_cell(settings: dict) -> str:
    """Steps, batches, learning rate and seed as the run's summary.json recorded them."""
    if not settings:
        return '<span class="muted">not recorded (run predates summary settings)</span>'
    if settings.get("sampling") == "poisson":
        batches = f"Poisson batches of expected size {settings['expected_batch_size']} (q = {fmt(settings['sample_rate'])})"
    else:
        batches = f"batch {settings['batch_size']}"
    return f"{settings['steps']} steps, {batches}, lr {fmt(settings['learning_rate'])}, seed {settings['seed']}"


def _runtime_note(runtime: dict) -> str:
    if not runtime:
        return ""
    where = runtime.get("device_name") or runtime.get("device", "?")
    return f'<br><span class="muted">{_e(where)}, {_e(runtime.get("precision", "?"))}</span>'


def _runs_table(runs: list[dict]) -> str:
    head = ("<tr><th>run</th><th>method</th><th>data</th><th>training</th><th>LoRA</th>"
            "<th>privacy</th><th>wall time</th></tr>")
    rows = []
    for r in runs:
        d, m, s = r["dataset"], r["membership"], r["settings"]
        members = m.get("member_aux", 0) + m.get("member_test", 0)
        rows.append(
            f"<tr data-run=\"{_e(r['name'])}\"><td><b>{_e(r['name'])}</b></td><td>{_e(r['method'])}</td>"
            f"<td>{_e(d.get('name', '?'))} ({members} members of {d.get('num_examples', '?')})</td>"
            f"<td>{_training_cell(s)}</td>"
            f"<td>rank {s.get('lora_rank', '?')}, α {fmt(s.get('lora_alpha'))}</td><td>{_privacy_cell(r['privacy'])}</td>"
            f"<td class=num>{fmt(r['wall_time_s'])} s{_runtime_note(r.get('runtime') or {})}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _sizes(record: dict) -> str:
    parts = []
    if "n_generated" in record:
        parts.append(f"{record['n_generated']} gen.")
    if "n_reference" in record:
        parts.append(f"{record['n_reference']} ref.")
    return ", ".join(parts)


def _metrics_table(runs: list[dict], keys: list[str]) -> str:
    head = "<tr><th>metric</th>" + "".join(f"<th>{_e(r['name'])}</th>" for r in runs) + "</tr>"
    rows = []
    for key in keys:
        cells = []
        for r in runs:
            rec = r["metrics"].get(key)
            if rec is None:
                cells.append("<td>–</td>")
                continue
            lo, hi = rec["ci"]
            cells.append(f'<td class=num>{fmt(rec["value"])} <span class=ci>[{fmt(lo)}, {fmt(hi)}]</span>'
                         f'<br><span class=muted>{_e(_sizes(rec))}</span></td>')
        rows.append(f"<tr><td>{_e(key)}</td>{''.join(cells)}</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _eval_notes(runs: list[dict]) -> str:
    notes = []
    extractors = sorted({r["extractor"] for r in runs if r["extractor"]})
    if extractors:
        notes.append("Feature extractor: " + ", ".join(f"<code>{_e(x)}</code>" for x in extractors)
                     + (" — <b>different extractors: FID/KID are not comparable across these runs</b>"
                        if len(extractors) > 1 else ""))
    configs = [r["eval_config"] for r in runs if r["eval_config"]]
    if configs:
        c = configs[0]
        notes.append(f"Sampler: {_e(c['scheduler']).upper()}, {c['num_inference_steps']} steps, η = 0, guidance "
                     f"{fmt(c['guidance_scale'])}; {c['num_samples']} samples, seeds 0…{c['num_samples'] - 1} "
                     f"from eval seed {c['eval_seed']}; 95 % intervals from {c['bootstrap']} bootstrap resamples "
                     f"(Clopper–Pearson for accuracies).")
    notes.append("FID/KID use privdiff's offline extractor, not Inception: they are not comparable with "
                 "published FIDs. Held-out losses are computed on private examples and are not covered "
                 "by any DP guarantee.")
    return "".join(f'<p class="muted">{n}</p>' for n in notes)


def _samples(runs: list[dict]) -> str:
    cards = []
    for r in runs:
        path = r["images"]["eval_samples"] or r["images"]["samples"]
        if path is None:
            continue
        label = "evaluation samples (first 100)" if r["images"]["eval_samples"] else "training-time samples"
        cards.append(f'<div class=card><b>{_e(r["name"])}</b> <span class=muted>{label}</span><br>'
                     f'{_img(Path(path).read_bytes(), r["name"] + " samples")}</div>')
    return f"<div class=grid>{''.join(cards)}</div>" if cards else "<p class=muted>no sample grids</p>"


def _audit_section(runs: list[dict]) -> str:
    audited = [r for r in runs if r["audit"]]
    if not audited:
        return "<p class=muted>not audited yet: run <code>privdiff audit RUN_DIR</code></p>"
    parts = []
    for r in audited:
        a = r["audit"]
        head = ("<tr><th>attack</th><th>AUC</th><th>TPR@0.1% FPR</th><th>TPR@1% FPR</th><th>TPR@5% FPR</th>"
                "<th>ASR (aux threshold)</th><th>queries/example</th><th>examples/s</th></tr>")
        rows = []
        for name, x in a["attacks"].items():
            limited = ' <span class=muted>(resolution-limited)</span>'
            tpr = "".join(f"<td class=num>{_estimate(x['tpr_at_fpr'][k])}{limited if x['resolution_limited'][k] else ''}"
                          f"</td>" for k in ("0.001", "0.01", "0.05"))
            best = " <b>(best on aux)</b>" if name == a["best_attack"] else ""
            rows.append(f"<tr><td>{_e(name)}{best}</td><td class=num>{_estimate(x['auc'])}</td>{tpr}"
                        f"<td class=num>{fmt(x['asr']['value'])} ({fmt(x['asr_aux_threshold'])})</td>"
                        f"<td class=num>{x['queries_per_example']}</td><td class=num>{fmt(x['examples_per_second'])}</td></tr>")
        cp, one = a["eps_lower_bound"]["cp"], a["eps_lower_bound"].get("one_run")
        bounds = (f"Empirical ε lower bound, Clopper–Pearson at the aux-chosen threshold of {_e(cp['attack'])}: "
                  f"<b>{fmt(cp['eps'])}</b> (TP {cp['tp']}/{cp['n_members']}, FP {cp['fp']}/{cp['n_nonmembers']}, "
                  f"δ = {fmt(cp['delta'])}; indicative only — examples of one run are not independent trials).")
        if one:
            bounds += (f"<br>One-run canary audit ({_e(one['attack'])}): {one['v']}/{one['r']} guesses correct on "
                       f"{one['m']} canaries → ε lower bound <b>{fmt(one['eps'])}</b> at p = {one['p']}, "
                       f"δ = {fmt(one['delta'])}.")
        if a.get("claimed_epsilon") is not None:
            bounds += f"<br>Claimed ε of this run: {fmt(a['claimed_epsilon'])}."
        control = r.get("control_audit")
        if control:
            spread = 3 * control["null_auc_sd"]
            worst = max(abs(x["auc"]["value"] - 0.5) for x in control["attacks"].values())
            verdict = "all attacks at chance" if worst <= spread else "<b>an attack is above chance: the split leaks</b>"
            bounds += (f"<br>Control (base model, no adapter): largest |AUC − 0.5| = {fmt(worst)} against a 3-sd null "
                       f"band of {fmt(spread)} — {verdict}.")
        roc = _img(Path(r["images"]["roc"]).read_bytes(), f"{r['name']} ROC") if r["images"]["roc"] else ""
        parts.append(f"<h3>{_e(r['name'])}</h3><p class=muted>test split: {a['n_members_test']} members, "
                     f"{a['n_nonmembers_test']} non-members; null AUC sd {fmt(a['null_auc_sd'])}; "
                     f"attacks fitted on {a['n_members_aux']} + {a['n_nonmembers_aux']} auxiliary examples; "
                     f"95 % stratified bootstrap intervals ({a['config']['bootstrap']} resamples)</p>"
                     f"<table>{head}{''.join(rows)}</table><p>{bounds}</p>{roc}")
    caveats = "".join(f"<li>{_e(c)}</li>" for c in audited[0]["audit"]["caveats"])
    return "".join(parts) + f"<p class=muted>Caveats:</p><ul class=muted>{caveats}</ul>"


def _best(run: dict) -> tuple[str, dict] | None:
    audit = run.get("audit")
    return (audit["best_attack"], audit["attacks"][audit["best_attack"]]) if audit else None


def _estimate(entry: dict | None, spec=fmt) -> str:
    """An estimate as the report writes every one: value, then its interval in a muted span."""
    return format_estimate(entry, spec, interval=lambda text: f"<span class=ci>{text}</span>")


def _paired_differences(matched: list[dict]) -> str:
    lines = []
    for row in matched:
        for name, d in row["differences"].items():
            lines.append(f"AUC of {_e(row['attack'])} on <b>{_e(row['defended'])}</b> minus on <b>{_e(d['run'])}</b> "
                         f"({_e(name)}): {_estimate(d, '+.3f')}")
    if not lines:
        return ""
    return (f"<p>{'<br>'.join(lines)}</p><p class=muted>Paired stratified bootstrap over the shared test examples "
            f"({matched[0]['resamples']} resamples), one "
            "training seed per run: the interval covers the test sample, not retraining.</p>")


def _matched_utility(runs: list[dict], matched: list[dict] | None = None) -> str:
    """Each early-stopped run beside the run it was matched to and the full run it was cut from."""
    by_path = {r["path"]: r for r in runs}
    rows = []
    for r in runs:
        match = r.get("early_stopped")
        if not match:
            continue
        loss_at = {c["step"]: c["loss"] for c in match["candidates"]}
        for role, run, loss in (("defended", by_path.get(match["matched_to"]), match["target_loss"]),
                                (f"early-stopped (step {match['step']})", r, match["loss"]),
                                (f"full ({match['of_steps']} steps)", by_path.get(match["from_run"]),
                                 loss_at.get(match["of_steps"]))):
            if run is None:
                continue
            best = _best(run)
            attack = (f"{_e(best[0])}: AUC {_estimate(best[1]['auc'])}, TPR@5% FPR "
                      f"{fmt(best[1]['tpr_at_fpr']['0.05']['value'])}" if best else "not audited")
            rows.append(f"<tr><td>{_e(role)}</td><td><b>{_e(run['name'])}</b></td><td class=num>{fmt(loss)}</td>"
                        f"<td>{attack}</td><td class=num>{_estimate(run['metrics'].get('kid/members'))}</td></tr>")
    if not rows:
        return ""
    head = ("<tr><th>role</th><th>run</th><th>held-out loss on aux non-members</th><th>best attack (chosen on aux)</th>"
            "<th>KID vs members</th></tr>")
    return ("<h2>Matched utility</h2><p class=muted>A defence that slows learning leaks less for that reason alone. "
            "The plain run is also stopped at the snapshot whose held-out denoising loss on the auxiliary "
            "non-members is closest to the defended run's (never matched on a test split); a defence helps only "
            f"if it leaks less than that early-stopped run.</p><table>{head}{''.join(rows)}</table>"
            + _paired_differences(matched or []))


def _proxy_notes(runs: list[dict]) -> str:
    notes = []
    for r in runs:
        smp = r.get("smp")
        if not smp:
            continue
        last = next((row for row in reversed(r["epochs"]) if row.get("proxy_acc_aux") is not None), {})
        notes.append(f"<b>{_e(r['name'])}</b> ({_e(smp['method'])}, λ = {fmt(smp['lambda'])}, β = {fmt(smp['beta'])}, "
                     f"k = {smp['k']}, proxy lr {fmt(smp['proxy_lr'])} = {fmt(smp['proxy_lr_over_lora_lr'])} × LoRA lr, "
                     f"{smp['proxy_batch_per_class']} + {smp['proxy_batch_per_class']} per proxy step): final "
                     f"co-trained proxy accuracy aux {fmt(last.get('proxy_acc_aux'))}, test {fmt(last.get('proxy_acc_test'))}; "
                     f"{'<b>diverged</b>' if smp['diverged'] else 'did not diverge'} (min J {fmt(smp['min_objective'])}, "
                     f"initial L {fmt(smp['initial_loss'])}); step cost {fmt(smp['cost_ratio_vs_lora'])} × plain.")
    if not notes:
        return ""
    return ("<p class=muted>The co-trained proxy is a training diagnostic, never the privacy result: the audit "
            "above retrains every attack from scratch on the frozen final model.</p>"
            + "".join(f"<p>{n}</p>" for n in notes))


def _split_cell(entry: dict | None, target: str) -> str:
    if entry is None or target not in entry["scores"]:
        return "–"
    verdict = "<b class=nodp>leaks</b>" if entry["leaks"][target] else "<span class=dp>resists</span>"
    return f"{_estimate(entry['scores'][target]['all']['ssim'])} {verdict}"


def _split_attacks_section(grids: list[dict]) -> str:
    """Attack × defence table per grid: reconstruction SSIM with the verdict, utility and accounted ε."""
    parts = []
    for grid in grids:
        rows = grid["rows"]
        attacks = attacks_in(rows)
        head = "<tr><th>defence</th>" + "".join(f"<th>{_e(a)}<br>image / condition SSIM</th>" for a in attacks) + \
            "<th>utility, trained − untrained: edge SSIM; disk IoU</th><th>ε per sample</th></tr>"
        body = []
        for r in rows:
            cells = "".join(f"<td>{_split_cell(r['attacks'].get(a), 'image')}<br>"
                            f"{_split_cell(r['attacks'].get(a), 'condition')}</td>" for a in attacks)
            utility = _e(utility_cell(r.get("utility")))
            worst = worst_client(r)
            if worst:
                eps = (f"<span class=dp>image {fmt(worst['worst_image_epsilon'])}, total "
                       f"{fmt(worst['worst_epsilon'])}</span> <span class=muted>δ = {fmt(worst['delta'])}</span>")
            else:
                eps = '<span class="nodp">none</span>'
            body.append(f"<tr><td><b>{_e(r['defence'])}</b><br><span class=muted>{_e(r['note'])}</span></td>{cells}"
                        f"<td>{utility}</td><td>{eps}</td></tr>")
        first = next((r for r in rows if r["attacks"]), None)
        reference = ""
        if first:
            baseline, ceiling = (f"image {fmt(reference_ssim(first, kind, 'image'))}, condition "
                                f"{fmt(reference_ssim(first, kind, 'condition'))}" for kind in ("baseline", "ceiling"))
            reference = (f"No-information baseline (mean public image) SSIM: {baseline}; "
                         f"autoencoder ceiling: {ceiling}. ")
        parts.append(f"<h3>{_e(grid['name'])}</h3><p class=muted>{grid['victims']} held-out victims per attack. "
                     f"{reference}{_e(grid.get('rule', ''))}. ε: per sample, replace-one local DP of the hardened "
                     f"option (image latent alone, and with the condition; ∞ = that part is unprotected).</p>"
                     f"<table>{head}{''.join(body)}</table>{_img(grid_figure(grid), 'split attacks')}")
    return "".join(parts)


def _weights_attacks_section(results: list[dict]) -> str:
    """Per weights-attack run: the attack against its bounds, the ablation, the baseline, the defences."""
    parts = []
    for r in results:
        agg = r["aggregate"]
        rows = [("attack (the file only)", agg.get("attack")), ("true prompt (upper bound)", agg.get("true_prompt")),
                ("random embedding (lower bound)", agg.get("random_embedding")),
                ("base model, 'a face' (lower bound)", agg.get("base"))]
        if "ablation" in r:
            rows.append((f"ablation: {r['ablation']['label']}", r["ablation"]["aggregate"].get("attack")))
        matching = r.get("update_matching")
        if matching:
            rows += [(f"update matching, dummy images ({len(matching['victims'])} victims)",
                      matching["aggregate"].get("dummy_images")),
                     ("update matching, dummy prompt", matching["aggregate"].get("dummy_prompt"))]
        body = "".join(f"<tr><td>{_e(name)}</td><td>{_estimate(e and e['identity_similarity'])}</td>"
                       f"<td>{_estimate(e and e['retrieval'])}</td></tr>" for name, e in rows)
        table = f"<table><tr><th>condition</th><th>identity similarity</th><th>top-1 retrieval</th></tr>{body}</table>"
        gap = agg.get("gap_closed")
        notes = [f"{agg['victims']} held-out victims; retrieval gallery {r['gallery_size']} identities "
                 f"(chance {fmt(r['chance_retrieval'])}). Input mode <b>{_e(r['headline']['input_mode'])}</b>; "
                 f"{_e(r['threat_model'])}.",
                 f"Attack − random embedding: {_estimate(agg.get('attack_minus_random'))}; gap closed "
                 f"{fmt(gap) if gap is not None else '–'}."]
        if "ablation" in r:
            notes.append(f"Step-embedding paradigm − ablation at equal compute: "
                         f"{_estimate(r['ablation']['paradigm_minus_ablation'])}.")
        meta = r["metadata_attack"]
        notes.append(f"Metadata attack: trigger word in {meta['recovered']} of {meta['of']} file headers.")
        parts.append(f"<h3>{_e(r['name'])}</h3>{table}<p class=muted>{' '.join(notes)}</p>")
        defences = r.get("defences")
        if defences:
            drows = "".join(
                f"<tr><td>{_e(p['defence'])}</td><td>{'–' if p['knob'] is None else fmt(p['knob'])}</td>"
                f"<td>{_estimate(p['utility'])}</td><td>{_estimate(p['attack'])}</td>"
                f"<td>{_estimate(p.get('adaptive_attack'))}</td></tr>" for p in defences["points"])
            parts.append("<h4>Defences: utility against leak</h4><table><tr><th>defence</th><th>knob</th>"
                         "<th>utility (true-prompt identity similarity)</th><th>attack identity similarity</th>"
                         f"<th>adaptive attack</th></tr>{drows}</table>"
                         f"<p class=muted>{defences.get('victims', 'All')} victims. Lower bound (random embedding): "
                         f"{_estimate(defences['lower_bound'])}. "
                         "DP-LoRA is example-level: the identity is shared by all its images, so it is protected "
                         "only through group privacy.</p>" + _img(weights_defence_curve(defences), "defence curve"))
        grid = Path(r["path"]) / "attack_grid.png"
        if grid.is_file():
            parts.append("<p class=muted>Rows: victims. Columns: private images | true prompt | attack | random "
                         "embedding.</p>" + _img(grid.read_bytes(), "attack grid"))
    return "".join(parts)


def _verdict_line(name: str, privacy: dict, audit: dict | None, note: str = "") -> str:
    said = verdict(audit)
    style = {"caught": "caught", "at chance": "chance"}.get(said["kind"], "")
    guarantee = guarantee_text(privacy) if privacy is not None else ""
    cls = "dp" if privacy and privacy.get("epsilon") is not None else "nodp"
    return (f"<li><b>{_e(name)}</b>{note} — " + (f'<span class="{cls}">{_e(guarantee)}</span>; ' if guarantee else "")
            + f'<span class="{style}">{_e(said["text"])}</span></li>')


def _headline(runs: list[dict]) -> str:
    """The first section: one verdict line per run (and the control), and the privacy-utility chart."""
    lines = [_verdict_line(r["name"], r["privacy"], r["audit"]) for r in runs]
    control_run = next((r for r in runs if r.get("control_audit")), None)
    control = None
    if control_run:
        audit = control_run["control_audit"]
        lines.append(_verdict_line("control", None, audit, f" (the base model without {_e(control_run['name'])}'s "
                                                            "adapter, on its members)"))
        best = audit["attacks"][audit["best_attack"]]
        control = {"auc": best["auc"], "tpr": best["tpr_at_fpr"].get("0.01")}
    parts = [f"<ul class=verdicts>{''.join(lines)}</ul>"]
    key, label = next(((k, lab) for k, lab in UTILITY_MEASURES if any(k in r["metrics"] for r in runs)), (None, None))
    points = []
    for r in runs:
        if not r["audit"] or key not in r["metrics"]:
            continue
        best = r["audit"]["attacks"][r["audit"]["best_attack"]]
        epsilon = r["privacy"].get("epsilon") if r["privacy"] else None
        points.append({"label": r["name"] + (f" (ε = {epsilon:.3g})" if epsilon is not None else ""),
                       "utility": r["metrics"][key], "auc": best["auc"], "tpr": best["tpr_at_fpr"]["0.01"]})
    if points:
        parts.append(_img(plots.privacy_utility(points, control, label), "privacy against utility"))
    parts.append(f'<p class="muted">Caught: the best attack (chosen on the auxiliary split) has the lower end of '
                 f"its 95 % interval above 0.5 + {CAUGHT_NULL_SD} null sd. At chance: every attack's test AUC is "
                 f"within {CHANCE_NULL_SD} null sd of 0.5 (null sd: an attack without information on this test "
                 "split). (ε, δ)-DP: the run's accounted guarantee per example. TPR at 1 % FPR is resolution-limited "
                 "when the test split has fewer than 100 non-members."
                 + (f" x axis: {_e(label)}, 95 % interval." if points else
                    " No chart: no run is both evaluated and audited.") + "</p>")
    return "<h2>Headline: who is caught, at what utility</h2>" + "".join(parts)


def render(report: dict) -> str:
    """The HTML page for `report` (the output of `collect`)."""
    runs, keys = report["runs"], report["metric_keys"]
    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    grids = report.get("split_attacks") or []
    head = [f"<h1>privdiff report card</h1><p class=muted>{len(runs)} run(s) · privdiff {_e(__version__)}"
            f" · generated {when}</p>"]
    split = ["<h2>Split learning: attacks × defences</h2>", _split_attacks_section(grids)] if grids else []
    weights = report.get("weights_attacks") or []
    if weights:
        split += ["<h2>Shared LoRA weights: what the file reveals</h2>", _weights_attacks_section(weights)]
    if not runs:
        return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>privdiff report</title>"
                f"<style>{STYLE}</style></head><body>{''.join(head + split)}</body></html>")
    body = head + [_headline(runs), "<h2>Runs</h2>", _runs_table(runs), "<h2>Utility</h2>"]
    if keys:
        body += [_metrics_table(runs, keys), _eval_notes(runs)]
        figure = plots.metric_comparison(runs, keys)
        if figure:
            body.append(_img(figure, "metric comparison"))
    else:
        body.append("<p class=muted>not evaluated yet: run <code>privdiff evaluate RUN_DIR</code></p>")
    body += ["<h2>Membership audit</h2>", _audit_section(runs), _matched_utility(runs, report.get("matched")),
             "<h2>Samples</h2>", _samples(runs)]
    proxy_figure = plots.proxy_diagnostics(runs)
    if proxy_figure:
        body += ["<h2>Training against the proxy attacker (per epoch)</h2>", _proxy_notes(runs),
                 _img(proxy_figure, "proxy diagnostics")]
    for title, figure in (("Training curves", plots.training_curves(runs)),
                          ("Held-out denoising loss by timestep", plots.heldout_by_timestep(runs))):
        if figure:
            body += [f"<h2>{title}</h2>", _img(figure, title)]
    body += split
    return ("<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>privdiff report</title>"
            f"<style>{STYLE}</style></head><body>{''.join(body)}</body></html>")
