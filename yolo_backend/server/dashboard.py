"""The dashboard: an HTML page for people, the same numbers as JSON for scripts, Prometheus metrics.

    GET /             the page for a browser (Accept: text/html); the health JSON for everyone else, as before
    GET /dashboard    the page, whatever the Accept header
    GET /status       everything on the page as JSON (?project=<id> for one project)
    GET /prometheus   Prometheus metrics (see prometheus.py)

Per project the page shows the version serving it, the current training job (phase, epoch, loss, a progress
bar, ETA; kept live by a small inline script polling /status), the learning curve and per-class mAP (SVG drawn
here, see charts.py), every version and training run with its validation metrics and why it was published or
rejected, and the last warnings. It loads nothing from the network (no CDN; the Content-Security-Policy allows
nothing else) and works behind the app's Basic Auth (the guard in app.py covers these paths).

``register_dashboard(app, context, health_view, predict_metrics)`` adds the routes; nothing here imports torch.
"""

from __future__ import annotations

import secrets
from typing import Any, Callable, Optional

from flask import Blueprint, Flask, Response, abort, current_app, jsonify, render_template_string, request

from ..jobs.publish import MIN_VALIDATION_IMAGES
from . import charts
from . import status as dashboard_status
from .base import parse_project_id
from .prometheus import PredictMetrics, StateCollector, exposition
from .status import version_details  # noqa: F401  (app.py adds these to /versions)

HTML_TYPE = "text/html"
POLL_MS = 2000


def wants_html() -> bool:
    """True when the client prefers HTML (a browser); curl, Label Studio and health checks send ``*/*`` or
    nothing, and keep getting JSON."""
    accept = request.accept_mimetypes
    return HTML_TYPE in accept.values() and accept.best_match(["application/json", HTML_TYPE]) == HTML_TYPE


def register_dashboard(app: Flask, context, health_view: Callable[[], Any], predict_metrics: PredictMetrics) -> None:
    predict_metrics.install(app)
    predict_metrics.registry.register(StateCollector(context))
    blueprint = Blueprint("dashboard", __name__)

    @blueprint.get("/")
    def index():
        if wants_html():
            return page()
        return health_view()

    @blueprint.get("/dashboard")
    def page():
        nonce = secrets.token_urlsafe(16)  # lets the page's own inline script run, nothing else
        html = render_page(dashboard_status.status(context, _project_arg()), nonce)
        response = Response(html, mimetype=HTML_TYPE)
        # Nothing but this page's own inline style and script, and /status: no CDN can sneak in.
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; connect-src 'self'; img-src 'self' data:; style-src 'unsafe-inline'; "
            f"script-src 'nonce-{nonce}'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
        response.headers["Cache-Control"] = "no-store"
        return response

    @blueprint.get("/status")
    def status():
        return jsonify(dashboard_status.status(context, _project_arg()))

    @blueprint.get("/prometheus")
    def prometheus():
        return exposition(predict_metrics)

    app.register_blueprint(blueprint)
    dashboard_status.recent_warnings()  # start keeping warnings from now on


def _project_arg() -> Optional[int]:
    """``?project=<id>`` (None: every project); anything but an integer answers 400."""
    try:  # the rule /predict and /webhook use; str.isdigit() would pass digits int() refuses ("¹")
        return parse_project_id(request.args.get("project"))
    except ValueError as exc:
        abort(400, description=str(exc))


# --------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------

def _num(value: Any, digits: int = 3) -> str:
    """A number for the page; "–" for a missing one (None, or a field the version's meta.json lacks)."""
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) else "–"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)):
        return "–"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def learning_curve_svg(points: list[dict]) -> str:
    """The curve of the runs whose mAP rests on enough validation images (``status.MIN_VAL_IMAGES``): a point
    measured on 2 images says nothing about the model and would stretch the axis to 1."""
    def label(p: dict, key: str, what: str) -> str:
        on = f", on {p['val_images']} validation images" if p.get("val_images") is not None else ""
        return (f"{p.get('name') or 'rejected run'} ({p['status']}): {what} {p[key]:.3f} "
                f"with {p['images']} annotated tasks{on}")

    shown = [p for p in points if not p.get("too_few")]
    series = [
        charts.Series("mAP@0.5", [charts.Point(p["images"], p["map50"], p["status"] == "published",
                                               label(p, "map50", "mAP@0.5")) for p in shown]),
        charts.Series("mAP@0.5:0.95", [charts.Point(p["images"], p["map"], p["status"] == "published",
                                                    label(p, "map", "mAP@0.5:0.95"))
                                       for p in shown if p.get("map") is not None]),
    ]
    empty = "No trained version yet: the curve starts with the first training." if not points else \
        f"No run validated on {dashboard_status.MIN_VAL_IMAGES} or more images yet: too few to say."
    return charts.line_chart(series, "Learning curve: validation mAP as annotations grow", "annotated tasks",
                             "validation mAP (0–1, higher is better)", y_min_top=0.1, empty_message=empty,
                             note="● published version   ○ trained but not published (not better than the "
                                  "version serving)")


def curve_left_out(points: list[dict]) -> Optional[str]:
    """The line under the curve that says which runs it leaves out, if any."""
    few = [p for p in points if p.get("too_few")]
    if not few:
        return None
    runs = "1 run" if len(few) == 1 else f"{len(few)} runs"
    counts = ", ".join(str(p.get("val_images")) for p in few[-5:])
    return (f"Left out: {runs} validated on fewer than {dashboard_status.MIN_VAL_IMAGES} images (on {counts}"
            f"{' …' if len(few) > 5 else ''}): too few to say.")


def per_class_svg(entry: Optional[dict]) -> str:
    metrics = (entry or {}).get("metrics") or {}
    classes = metrics.get("per_class") or []
    name = (entry or {}).get("name") or "the serving version"
    on = f"on {metrics['val_images']} validation images" if metrics.get("val_images") is not None else "validation"
    title = f"mAP per class of {name} ({on})"
    if metrics.get("too_few"):
        return charts.bar_chart([], [], title, empty_message=f"Per class: {metrics.get('note')}.")
    return charts.bar_chart([c["name"] for c in classes],
                            [("mAP@0.5", [None if c.get("too_few") else c.get("map50") for c in classes]),
                             ("mAP@0.5:0.95", [None if c.get("too_few") else c.get("map") for c in classes])],
                            title, notes=[c.get("note") for c in classes],
                            empty_message="No validation metrics for the serving version yet.")


def render_page(data: dict, nonce: str) -> str:
    """The page for ``data`` (what ``status.status`` returns); ``nonce`` lets its inline script run."""
    projects = data["projects"]
    for project in projects:
        serving = next((e for e in project["versions"] if e.get("serving")), None)
        project["curve_svg"] = learning_curve_svg(project["learning_curve"])
        project["curve_left_out"] = curve_left_out(project["learning_curve"])
        project["per_class_svg"] = per_class_svg(serving or next(
            (e for e in project["versions"] if e["status"] == "published" and e.get("metrics")), None))
    return render_template_string(PAGE, data=data, projects=projects, nonce=nonce, poll_ms=POLL_MS,
                                  num=_num, duration=_duration,
                                  model_class=current_app.extensions["ml_backend"].backend_class.__name__,
                                  threshold=data["serve_threshold"], min_val=dashboard_status.MIN_VAL_IMAGES,
                                  min_boxes=dashboard_status.MIN_CLASS_BOXES,
                                  min_compare=MIN_VALIDATION_IMAGES,
                                  min_first=current_app.extensions["ml_backend"].context.settings
                                  .min_annotations_first_training)


PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>YOLOv7 backend – dashboard</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 1440px; padding: 0 16px 40px; color: #222; }
  header { display: flex; justify-content: space-between; align-items: baseline; border-bottom: 1px solid #ddd; }
  h1 { font-size: 1.4em; } h2 { font-size: 1.2em; margin-top: 1.6em; } h3 { font-size: 1em; margin: 1.2em 0 .4em; }
  .muted { color: #666; font-size: .9em; }
  .card { border: 1px solid #ddd; border-radius: 6px; padding: 10px 14px; margin: 8px 0; background: #fafafa; }
  .facts span { margin-right: 1.4em; white-space: nowrap; }
  .progress { display: flex; align-items: center; gap: 10px; }
  .bar { flex: 0 1 600px; height: 18px; background: #e6e6e6; border-radius: 9px; overflow: hidden; margin: 8px 0; }
  .bar .fill { height: 100%; background: #1f77b4; }
  .charts { display: flex; flex-wrap: wrap; gap: 16px; }
  .charts > div { flex: 1 1 480px; }
  .table-wrap { overflow-x: auto; }
  table { border-collapse: collapse; width: 100%; font-size: .85em; }
  /* Fits 1280 px: version names, MODEL_PATH checkpoints and reasons wrap (anywhere: names have no spaces), so no
     column is wider than its share; only the short number cells stay on one line. */
  td.name { overflow-wrap: anywhere; min-width: 10.5em; }
  td.n.created { white-space: normal; }
  .created span { white-space: nowrap; }
  th, td { border-bottom: 1px solid #e3e3e3; padding: 5px 6px; text-align: left; vertical-align: top; }
  th { background: #f0f0f0; }
  td.n { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
  td.too-few { color: #666; font-style: italic; text-align: center; }
  .evidence { display: block; color: #666; font-size: .85em; }
  .status-published { color: #1a7f37; font-weight: 600; } .status-rejected { color: #b35900; font-weight: 600; }
  .status-failed { color: #c62828; font-weight: 600; } .status-skipped { color: #666; font-weight: 600; }
  .serving { background: #eef6ff; }
  .tag { font-size: .8em; background: #1f77b4; color: #fff; border-radius: 3px; padding: 0 4px; }
  .tag.not-compared { background: #b35900; }
  .img-size.guess { color: #b35900; } .img-size.guess b { color: #b35900; }
  .status-waiting { color: #666; font-weight: 600; }
  ul.warnings { font-family: ui-monospace, monospace; font-size: .85em; padding-left: 1.2em; }
  tr.per-class td { font-size: .92em; color: #444; padding-top: 0; }
  tr.has-classes td { border-bottom: none; }
  .class { margin-right: 2em; white-space: nowrap; }
  td.why { min-width: 14em; overflow-wrap: anywhere; }
  details summary { cursor: pointer; }
</style>
</head>
<body>
<header>
  <h1>YOLOv7 backend · dashboard</h1>
  <span class="muted" id="updated">as of {{ data.generated_at_iso | replace("T", " ") | replace("Z", " UTC") }} · live (refreshes every {{ poll_ms // 1000 }} s)</span>
</header>
<p class="muted">Models learn from the annotations in Label Studio: each training run reads every annotated task,
fine-tunes the model serving the project, measures it on the validation images (about 20% of the annotated tasks,
always the same ones) and publishes it only when it is not worse than the model serving, each at the size it
serves at. With fewer than {{ min_compare }} validation images there is nothing to compare on: the version is
published and marked “not compared”. A project's first training waits for {{ min_first }} annotated tasks (images or clips)
(MIN_ANNOTATIONS_FIRST_TRAINING). Backend class: {{ model_class }}.</p>

<section id="queue">
<h2>Training queue</h2>
{% set q = data.queue %}
{% if q %}
<div class="card facts">
  <span>Redis: <b id="q-redis">{{ q.redis }}</b></span>
  <span>workers: <b id="q-workers">{{ q.workers if q.workers is not none else "–" }}</b></span>
  <span>running: <b id="q-started">{{ q.started if q.started is not none else "–" }}</b></span>
  <span>waiting: <b id="q-queued">{{ q.queued if q.queued is not none else "–" }}</b></span>
  <span>requests merged into a waiting job: <b id="q-coalesced">{{ q.coalesced or 0 }}</b></span>
  <span>saved while Redis was down: <b id="q-pending">{{ q.pending_requests or 0 }}</b></span>
  <span>finished: <b id="q-finished">{{ q.finished if q.finished is not none else "–" }}</b></span>
  <span>failed: <b id="q-failed">{{ q.failed if q.failed is not none else "–" }}</b></span>
</div>
{% else %}
<p class="card">This server has no training queue (it was started without one), so it only predicts.</p>
{% endif %}
</section>

{% if not projects %}
<h2>No project yet</h2>
<p class="card">Connect this backend to a Label Studio project (Settings → Model → Connect Model). Projects show up
here after their first prediction or training.</p>
{% endif %}

{% for p in projects %}
<section class="project" id="project-{{ p.project }}" data-project="{{ p.project }}" data-stamp="{{ p.stamp }}">
<h2>Project {{ p.project }} — serving <span id="serving-{{ p.project }}">{{ p.serving_version or "no model" }}</span></h2>
{% if p.serving_note %}<p class="muted">{{ p.serving_note }}</p>{% endif %}
{% set z = p.serving_img_size %}
{% if z %}<p class="img-size{{ ' guess' if z.guess else '' }}" id="img-size-{{ p.project }}">Inference size: <b>{{ z.size }}</b> ({{ z.reason }})</p>{% endif %}
{% set w = p.waiting_for_annotations %}
{% if w %}<p class="card waiting" id="waiting-{{ p.project }}"><b>Waiting for {{ w.more }} more annotation{{ "" if w.more == 1 else "s" }}</b> before the first training: {{ w.annotations }} of {{ w.needed }} annotated tasks (MIN_ANNOTATIONS_FIRST_TRAINING).</p>{% endif %}

<h3>Current training job</h3>
{% set j = p.job %}
<div class="card job" id="job-{{ p.project }}">
  <div class="facts">
    <span>job: <b class="job-id">{{ j.job if j else "none yet" }}</b></span>
    <span>state: <b class="job-status">{{ j.status if j else "–" }}</b></span>
    <span>phase: <b class="job-phase">{{ j.phase if j and j.phase else "–" }}</b></span>
    <span>epoch: <b class="job-epoch">{{ j.epochs_text if j and j.epochs_text else "–" }}</b></span>
    <span>loss: <b class="job-loss">{{ num(j.loss, 4) if j else "–" }}</b></span>
    <span>time left: <b class="job-eta">{{ ("about " ~ duration(j.eta_seconds)) if j and j.eta_seconds is not none else "–" }}</b></span>
  </div>
  {% set pct = "%g" | format((((j.fraction or 0) * 100) if j else 0) | round(1)) %}
  <div class="progress"><div class="bar" role="progressbar" aria-label="training progress" aria-valuemin="0"
       aria-valuemax="100" aria-valuenow="{{ pct }}"><div class="fill" style="width: {{ pct }}%"></div></div>
    <b class="job-percent">{{ pct }} %</b></div>
  <div class="muted job-message">{% if j and j.error %}error: {{ j.error }}{% elif j and j.message %}{{ j.message }}{% elif not j %}Training starts when an annotation is submitted in Label Studio with “Start model training on annotation submission” on (or with “Start Training”); the first one once the project has {{ p.min_annotations_first_training }} annotated tasks.{% endif %}</div>
</div>

<h3>Pool scoring</h3>
{% set q = p.pool %}
<div class="card pool" id="pool-{{ p.project }}">
  <div class="facts">
    <span>version: <b class="pool-version">{% if q and q.version %}{{ q.version }}{% if q.queued %} (previous run){% endif %}{% else %}–{% endif %}</b></span>
    <span>state: <b class="pool-state">{{ q.state_text if q else "not run yet" }}</b></span>
    <span>tasks scored: <b class="pool-done">{% if q %}{{ q.done }} of {{ q.total }}{% else %}–{% endif %}</b></span>
    <span>failed: <b class="pool-failed">{{ q.failed if q else "–" }}</b></span>
    <span>rate: <b class="pool-rate">{{ (num(q.rate, 1) ~ " tasks/s") if q and q.rate else "–" }}</b></span>
    <span>time left: <b class="pool-eta">{{ ("about " ~ duration(q.eta_s)) if q and q.eta_s is not none else "–" }}</b></span>
  </div>
  {% set ppct = "%g" | format((((q.fraction or 0) * 100) if q else 0) | round(1)) %}
  <div class="progress"><div class="bar" role="progressbar" aria-label="pool scoring progress" aria-valuemin="0"
       aria-valuemax="100" aria-valuenow="{{ ppct }}"><div class="fill" style="width: {{ ppct }}%"></div></div>
    <b class="pool-percent">{{ ppct }} %</b></div>
  <div class="muted pool-message">{% if q and q.error %}error: {{ q.error }}{% elif not q %}After each new version every task of the project gets a prediction of it, with its task score and image cluster, so Label Studio sorts and samples the whole project by the newest model.{% endif %}</div>
</div>

<h3>What the model saves annotators</h3>
{% set e = p.effort %}
<div class="card effort" id="effort-{{ p.project }}">
{% if e and e.versions %}
<p class="muted">From the annotations the newest training run read ({{ e.time_iso | replace("T", " ") | replace("Z", " UTC") }}): each task's final boxes against the prediction the annotator started from, by the version that made it. “From the model”: of the boxes in the final annotations, the share that was a predicted box accepted as is (IoU ≥ 0.9) or adjusted (IoU ≥ 0.5). An accepted wrong box counts as a saving too. Fewer than {{ e.min_tasks }} tasks: too few to say.</p>
<div class="table-wrap"><table class="effort-table">
<thead><tr><th>version</th><th>tasks</th><th>from the model</th><th>boxes drawn per task</th><th>median seconds per task</th><th>accepted / adjusted / deleted / drawn</th></tr></thead>
<tbody>
{% for v in e.versions %}
<tr data-version="{{ v.name }}">
  <td class="name">{{ v.name }}</td>
  <td class="n">{{ v.tasks }}</td>
  {% if v.too_few %}<td class="too-few" colspan="3">{{ v.note }}</td>{% else %}
  <td class="n share">{{ ("%g %%" | format(v.share_percent)) if v.share_percent is not none else "no boxes" }}<span class="evidence">of {{ v.final_boxes }} final boxes, {{ v.note }}{% if v.by_time %} ({{ v.by_time }} matched by time){% endif %}</span></td>
  <td class="n drawn">{{ v.drawn_per_task }}</td>
  <td class="n seconds">{% if v.median_seconds_shown is not none %}{{ v.median_seconds_shown }}{% if v.seconds_per_box is not none %}<span class="evidence">{{ v.seconds_per_box }} s per final box</span>{% endif %}{% else %}<span class="evidence">{{ v.timed_note }}</span>{% endif %}</td>
  {% endif %}
  <td class="n">{{ v.accepted }} / {{ v.adjusted }} / {{ v.deleted }} / {{ v.drawn }}</td>
</tr>
{% endfor %}
</tbody></table></div>
{% else %}
<p class="muted">Not known yet: worked out by each training run from the annotations it reads.</p>
{% endif %}
</div>

<div class="charts">
  <div>{{ p.curve_svg | safe }}{% if p.curve_left_out %}<p class="muted curve-left-out">{{ p.curve_left_out }}</p>{% endif %}</div>
  <div>{{ p.per_class_svg | safe }}</div>
</div>

<h3>Versions and training runs (newest first)</h3>
<p class="muted">mAP@0.5 and mAP@0.5:0.95: how well the predicted boxes match the labelled ones on the validation
images (0–1, higher is better; 0.5:0.95 also asks for tight boxes). P and R at {{ threshold }}: of the boxes shown
to annotators (confidence ≥ {{ threshold }}), the share that is right (precision), and the share of labelled boxes
found (recall). Images: annotated images trained and validated on, with boxes (positives) and without (negatives).
Each number rests on the validation images under it: with fewer than {{ min_val }} it is not shown (“too few to
say”: measured on 2 images, a model's mAP@0.5 came out exactly 1.000 about half the time, see README), nor a
class's with fewer than {{ min_boxes }} boxes.</p>
<div class="table-wrap"><table class="versions" id="versions-{{ p.project }}">
<thead><tr><th>version</th><th>outcome and why</th><th>trained from</th><th>created (UTC)</th>
<th>images (pos/neg)</th><th>train / val</th><th>train time</th><th>mAP@0.5</th><th>mAP@0.5:0.95</th>
<th>P@{{ threshold }}</th><th>R@{{ threshold }}</th></tr></thead>
<tbody>
{% for v in p.versions %}
{% set m = v.metrics or {} %}
<tr class="{{ 'serving' if v.serving else '' }}{{ ' has-classes' if m.per_class else '' }}">
  <td class="name">{{ v.name or "(not published)" }}{% if v.serving %} <span class="tag">serving</span>{% endif %}{% if v.job %}<br><span class="muted">job {{ v.job }}</span>{% endif %}</td>
  <td class="why"><span class="status-{{ v.status }}">{{ v.status }}</span>{% if v.not_compared %} <span class="tag not-compared">not compared</span>{% endif %}{% if v.reason %}: {{ v.reason }}{% endif %}</td>
  <td class="name parent">{{ v.parent or ("random init" if v.untrained else "–") }}{% if v.parent_img_size %}<span class="evidence">at {{ v.parent_img_size }}{% if v.parent_img_size_measured_now %}, {{ v.parent_img_size_reason }}{% endif %}</span>{% endif %}</td>
  <td class="n created">{% if v.created_iso %}<span>{{ v.created_iso[:10] }}</span> <span>{{ v.created_iso[11:19] }}</span>{% else %}–{% endif %}</td>
  <td class="n">{% if v.images is not none %}{{ v.images }} ({{ v.positives if v.positives is not none else "?" }} / {{ v.negatives if v.negatives is not none else "?" }}){% else %}–{% endif %}</td>
  <td class="n">{% if v.train_images is not none %}{{ v.train_images }} / {{ v.val_images }}{% else %}–{% endif %}</td>
  <td class="n">{{ duration(v.train_seconds) }}</td>
  {% if m.too_few %}<td class="too-few metrics" colspan="4">{{ m.note }}</td>
  {% else %}<td class="n metrics">{{ num(m.map50) }}{% if m.note %}<span class="evidence">{{ m.note | replace("validation ", "") }}</span>{% endif %}</td><td class="n">{{ num(m.map) }}</td>
  <td class="n">{{ num(m.precision) }}</td><td class="n">{{ num(m.recall) }}</td>{% endif %}
</tr>
{% if m.per_class %}
<tr class="per-class {{ 'serving' if v.serving else '' }}"><td></td><td colspan="10">{% if m.too_few %}per class: {{ m.note }}{% else %}per class{% if m.note %} ({{ m.note }}){% endif %}: {% for c in m.per_class %}<span class="class"><b>{{ c.name }}</b> {% if c.note %}{{ c.note }}{% elif c.instances %}mAP@0.5 {{ num(c.map50) }} · mAP@0.5:0.95 {{ num(c.map) }} · P {{ num(c.precision, 2) }} · R {{ num(c.recall, 2) }} ({{ c.instances }} boxes){% else %}no boxes among the validation images{% endif %}</span>{% endfor %}{% endif %}</td></tr>
{% endif %}
{% else %}
<tr><td colspan="11">Nothing trained or published yet.</td></tr>
{% endfor %}
</tbody>
</table></div>

{% if p.job_warnings %}
<h3>Warnings of the last training job</h3>
<ul class="warnings">{% for line in p.job_warnings %}<li>{{ line }}</li>{% endfor %}</ul>
{% endif %}
</section>
{% endfor %}

<section id="warnings">
<h2>Last warnings of this server</h2>
{% if data.warnings %}
<ul class="warnings">{% for w in data.warnings %}<li>{{ w.time_iso | replace("T", " ") | replace("Z", " UTC") }} {{ w.level }} {{ w.logger }}: {{ w.message }}</li>{% endfor %}</ul>
{% else %}
<p class="muted">None since the server started (images that cannot be read, refused Label Studio keys and other
problems show up here).</p>
{% endif %}
</section>

<p class="muted">The same numbers as JSON: <a href="status">/status</a>, <a href="versions">/versions</a>
(?project=&lt;id&gt;); Prometheus: <a href="prometheus">/prometheus</a>.</p>

<script nonce="{{ nonce }}">
"use strict";
(function () {
  function duration(s) {
    if (s === null || s === undefined) return "–";
    s = Math.round(s);
    if (s < 60) return s + " s";
    var m = Math.floor(s / 60); s = s % 60;
    if (m < 60) return m + " min " + String(s).padStart(2, "0") + " s";
    return Math.floor(m / 60) + " h " + String(m % 60).padStart(2, "0") + " min";
  }
  function num(v, digits) { return (v === null || v === undefined) ? "–" : v.toFixed(digits); }
  function set(root, selector, value) {
    var el = root.querySelector(selector);
    if (el && el.textContent !== String(value)) el.textContent = value;
  }
  function showJob(section, job) {
    var card = section.querySelector(".job");
    if (!card || !job) return;
    set(card, ".job-id", job.job || "none yet");
    set(card, ".job-status", job.status || "–");
    set(card, ".job-phase", job.phase || "–");
    set(card, ".job-epoch", job.epochs_text || "–");
    set(card, ".job-loss", num(job.loss, 4));
    set(card, ".job-eta", job.eta_seconds === null ? "–" : "about " + duration(job.eta_seconds));
    set(card, ".job-message", job.error ? "error: " + job.error : (job.message || ""));
    var pct = Math.round((job.fraction || 0) * 1000) / 10;
    var bar = card.querySelector(".bar");
    bar.setAttribute("aria-valuenow", String(pct));
    bar.querySelector(".fill").style.width = pct + "%";
    set(card, ".job-percent", pct + " %");
  }
  function showPool(section, pool) {
    var card = section.querySelector(".pool");
    if (!card || !pool) return;
    set(card, ".pool-version", pool.version ? pool.version + (pool.queued ? " (previous run)" : "") : "–");
    set(card, ".pool-state", pool.state_text || "–");  // worded by the server (status.pool_state_text)
    set(card, ".pool-done", pool.done + " of " + pool.total);
    set(card, ".pool-failed", pool.failed);
    set(card, ".pool-rate", pool.rate ? num(pool.rate, 1) + " tasks/s" : "–");
    set(card, ".pool-eta", pool.eta_s === null ? "–" : "about " + duration(pool.eta_s));
    set(card, ".pool-message", pool.error ? "error: " + pool.error : "");
    var pct = Math.round((pool.fraction || 0) * 1000) / 10;
    var bar = card.querySelector(".bar");
    bar.setAttribute("aria-valuenow", String(pct));
    bar.querySelector(".fill").style.width = pct + "%";
    set(card, ".pool-percent", pct + " %");
  }
  function showQueue(queue) {
    if (!queue) return;
    ["redis", "workers", "started", "queued", "coalesced", "finished", "failed"].forEach(function (key) {
      var el = document.getElementById("q-" + key);
      if (el && queue[key] !== undefined && queue[key] !== null) el.textContent = queue[key];
    });
    var pending = document.getElementById("q-pending");
    if (pending) pending.textContent = queue.pending_requests || 0;
  }
  function poll() {
    // The same projects as the page (/dashboard?project=3 polls status?project=3). Built on the origin, which
    // leaves out user:password@ of the address: fetch refuses URLs with credentials (Basic Auth still applies).
    var url = new URL("status" + window.location.search, window.location.origin + window.location.pathname);
    fetch(url.href, {headers: {"Accept": "application/json"}, cache: "no-store", credentials: "same-origin"})
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      })
      .then(function (data) {
        var changed = false;
        data.projects.forEach(function (project) {
          var section = document.querySelector('section[data-project="' + project.project + '"]');
          if (!section) { changed = true; return; }  // a project new since the page was drawn
          if (section.getAttribute("data-stamp") !== project.stamp) changed = true;
          showJob(section, project.job);
          showPool(section, project.pool);
        });
        showQueue(data.queue);
        document.getElementById("updated").textContent =
          "as of " + data.generated_at_iso.replace("T", " ").replace("Z", " UTC") + " · live (refreshes every {{ poll_ms // 1000 }} s)";
        // A new version or run: draw the table and the charts again (they are drawn on the server).
        if (changed) window.location.reload();
        else window.setTimeout(poll, {{ poll_ms }});
      })
      .catch(function (error) {
        document.getElementById("updated").textContent = "server not answering (" + error.message + "); retrying";
        window.setTimeout(poll, {{ poll_ms * 2 }});
      });
  }
  window.setTimeout(poll, {{ poll_ms }});
})();
</script>
</body>
</html>
"""
