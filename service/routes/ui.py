"""The results page: /ui/jobs (jobs and their states) and /ui/jobs/{id} (CT with the dose).

Slices are drawn on the server by :func:`spectdose.report.render_slice` (the renderer of the
PDF report's key images) from the job's ``view.npz``, and sent as PNG; a little vanilla JS
(service/ui_static/app.js) swaps them as the physicist scrolls, changes the opacity, the dose
window or the isodose levels. Nothing is loaded from the internet.

A browser logs in with an API token (POST /ui/login) and then carries a signed session cookie
(service/deps.py); a token is never taken from a URL. Every page, picture and piece of data
under /ui needs that session: pages redirect to the login form, the rest answers 401.
"""

from __future__ import annotations

import functools
import html
import io
import json
import math
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

import pydicom
from fastapi import APIRouter, Form, HTTPException, Query, Request
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, Response

from spectdose.report import (
    ORIENTATION,
    PLANES,
    TEXT_RC,
    ViewVolumes,
    default_isodose_levels,
    default_window,
    headline_lines,
    identifiers_from_header,
    isodose_colours,
    key_point,
    plot_dvh,
    png_bytes,
    region_colours,
    render_slice,
    table_rows,
)

from ..deps import (
    SESSION_COOKIE,
    SESSION_MAX_AGE_S,
    Ctx,
    ServiceContext,
    Viewer,
    check_token,
    make_session,
    revoke_session,
    session_actor,
)

router = APIRouter(prefix="/ui", include_in_schema=False)

STATIC_DIR = Path(__file__).resolve().parent.parent / "ui_static"
_STATIC_TYPES = {".js": "text/javascript", ".css": "text/css"}
# Pages and pictures hold patient data: never cached, never framed, scripts only from here.
_HEADERS = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    # same-origin, not no-referrer: under no-referrer Chromium sends "Origin: null" with the login form,
    # which the gateway's cross-site guard (service/guards.py) rightly refuses; no referrer leaves the site.
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self'; frame-ancestors 'none'; form-action 'self'",
}
_MAX_ISODOSE_LEVELS = 8


def _esc(value) -> str:
    return html.escape("" if value is None else str(value))


def _page(title: str, body: str, *, actor: str | None = None, status_code: int = 200) -> HTMLResponse:
    logout = ('<form method="post" action="/ui/logout" class="logout"><button type="submit">Log out</button></form>'
              if actor and actor != "anonymous" else "")
    text = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)} - spectdose</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="stylesheet" href="/ui/static/style.css"></head>
<body><header><a href="/ui/jobs" class="brand">spectdose</a> <span class="title">{_esc(title)}</span>{logout}</header>
<main>{body}</main></body></html>"""
    return HTMLResponse(text, status_code=status_code, headers=_HEADERS)


def _safe_next(target: str | None) -> str:
    """Where to go after logging in: a path under /ui only (no open redirect)."""
    if target and target.startswith("/ui/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui/jobs"


def _to_login(request: Request) -> RedirectResponse:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return RedirectResponse(f"/ui/login?next={quote(target, safe='')}", status_code=303, headers=_HEADERS)


def _secure(request: Request, ctx: ServiceContext) -> bool:
    public = ctx.settings.public_url or ""
    return request.url.scheme == "https" or ctx.settings.tls_certfile is not None or public.startswith("https:")


# ----------------------------------------------------------------------------------- login


_LOGIN_STYLE = """<style>body{font-family:sans-serif;background:#1e1f22;color:#ddd;display:flex;justify-content:center;
margin-top:12vh}form{background:#2b2d31;padding:2em;border-radius:6px;min-width:22em}input{width:100%;padding:.5em;
margin:.5em 0 1em;box-sizing:border-box}button{padding:.5em 1.5em}.error{color:#ff8080}</style>"""


def _login_form(next_path: str, error: str = "", status_code: int = 200) -> HTMLResponse:
    message = f'<p class="error" id="login-error">{_esc(error)}</p>' if error else ""
    text = f"""<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Log in - spectdose</title>
{_LOGIN_STYLE}</head><body><form method="post" action="/ui/login" id="login">
<h1>spectdose results</h1>{message}<label for="token">API token</label>
<input type="password" id="token" name="token" autocomplete="current-password" required autofocus>
<input type="hidden" name="next" value="{_esc(next_path)}">
<button type="submit" id="login-submit">Log in</button></form></body></html>"""
    return HTMLResponse(text, status_code=status_code, headers=_HEADERS)


@router.get("/login")
def login_page(request: Request, next: Annotated[str | None, Query()] = None):  # noqa: A002 - the query name
    if session_actor(request) is not None:
        return RedirectResponse(_safe_next(next), status_code=303, headers=_HEADERS)
    return _login_form(_safe_next(next))


@router.post("/login")
def login(request: Request, ctx: Ctx, token: Annotated[str, Form(max_length=4096)] = "",
          next: Annotated[str, Form(max_length=2048)] = "/ui/jobs"):  # noqa: A002 - the form field
    """Check the token like the API does (same throttle and audit), then set the session cookie."""
    if not ctx.settings.auth_enabled:
        return RedirectResponse(_safe_next(next), status_code=303, headers=_HEADERS)
    try:
        actor = check_token(request, token or None)
    except HTTPException as exc:
        reason = "wrong token" if exc.status_code == 401 else str(exc.detail)
        return _login_form(_safe_next(next), reason, status_code=exc.status_code)
    ctx.store.audit(actor, "ui_login", remote_host=request.client.host if request.client else None)
    response = RedirectResponse(_safe_next(next), status_code=303, headers=_HEADERS)
    response.set_cookie(SESSION_COOKIE, make_session(request, token), max_age=SESSION_MAX_AGE_S, path="/ui",
                        httponly=True, samesite="strict", secure=_secure(request, ctx))
    return response


@router.post("/logout")
def logout(request: Request, ctx: Ctx):
    """End the session on the server too (service/deps.py: revoke_session), so a copy of the old
    cookie opens nothing afterwards; then drop it from the browser."""
    actor = revoke_session(request)
    if actor is not None:
        ctx.store.audit(actor, "ui_logout", remote_host=request.client.host if request.client else None)
    response = RedirectResponse("/ui/login", status_code=303, headers=_HEADERS)
    response.delete_cookie(SESSION_COOKIE, path="/ui", httponly=True, samesite="strict", secure=_secure(request, ctx))
    return response


@router.get("/static/{name}")
def static(name: str, _viewer: Viewer):
    path = STATIC_DIR / name
    if path.suffix not in _STATIC_TYPES or path.parent != STATIC_DIR or not path.is_file():
        raise HTTPException(404, f"no asset {name!r}")
    return FileResponse(path, media_type=_STATIC_TYPES[path.suffix], headers={"Cache-Control": "private, max-age=300"})


# ----------------------------------------------------------------------------------- jobs


@router.get("")
@router.get("/")
def ui_root():
    return RedirectResponse("/ui/jobs", status_code=303, headers=_HEADERS)


@router.get("/jobs")
def jobs_page(request: Request, ctx: Ctx, offset: Annotated[int, Query(ge=0)] = 0):
    actor = session_actor(request)
    if actor is None:
        return _to_login(request)
    limit = 100
    jobs, total = ctx.store.list_jobs(limit=limit, offset=offset)
    rows = []
    for j in jobs:
        progress = f"{100 * (j.progress or 0):.0f} %" if j.state == "running" else ""
        rows.append(
            f'<tr class="state-{_esc(j.state)}"><td><a href="/ui/jobs/{_esc(j.id)}">{_esc(j.id[:12])}</a></td>'
            + _who_cells(ctx, j.id)
            + f'<td class="state">{_esc(j.state)}</td><td>{_esc(j.stage or "")} {progress}</td>'
            f"<td>{_esc(j.source)}{' ' + _esc(j.calling_aet) if j.calling_aet else ''}</td>"
            f"<td>{_esc((j.options or {}).get('method', ''))}</td>"
            f"<td>{_esc(j.created_at.isoformat(sep=' ', timespec='seconds') if j.created_at else '')}</td>"
            f"<td>{_esc(j.finished_at.isoformat(sep=' ', timespec='seconds') if j.finished_at else '')}</td>"
            f'<td class="reason">{_esc(j.reason or "")}</td></tr>'
        )
    more = (f'<p><a href="/ui/jobs?offset={offset + limit}">older jobs</a></p>' if offset + limit < total else "")
    body = f"""<p>{total} job(s), newest first (times in UTC). <a href="/ui/jobs">refresh</a></p>
<table id="jobs"><thead><tr><th>job</th><th>patient</th><th>patient ID</th><th>study date</th><th>state</th><th>stage</th>
<th>source</th><th>method</th><th>created</th><th>finished</th><th>reason</th></tr></thead>
<tbody>{''.join(rows) or '<tr><td colspan="11">no jobs yet</td></tr>'}</tbody></table>{more}"""
    return _page("Jobs", body, actor=actor)


_WHO_TAGS = ["PatientName", "PatientID", "StudyDate"]


@functools.lru_cache(maxsize=512)
def _header_who(path: str, _mtime_ns: int) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_WHO_TAGS)
    name = str(ds.get("PatientName", "") or "").replace("^", " ").strip()
    return name, str(ds.get("PatientID", "") or ""), _iso_date(str(ds.get("StudyDate", "") or ""))


def _iso_date(date: str | None) -> str:
    """A DICOM DA (YYYYMMDD) as YYYY-MM-DD; anything else as it is."""
    date = date or ""
    return f"{date[:4]}-{date[4:6]}-{date[6:8]}" if len(date) == 8 and date.isdigit() else date


def _who(ctx: ServiceContext, job_id: str) -> tuple[str, str, str]:
    """Patient name, ID and study date of a job, read from its files (the job store holds none):
    the result's header when there is one, else the first readable input file; blank once purged."""
    manifest = ctx.storage.output_manifest(job_id) or {"files": {}}
    candidates = [ctx.storage.job_output(job_id) / e["file"] for k, e in manifest["files"].items()
                  if k in ("rtdose", "doserate")]
    folder = ctx.storage.job_input(job_id)
    if folder.is_dir():
        candidates += sorted(p for p in folder.rglob("*") if p.is_file())[:3]
    for path in candidates:
        try:
            return _header_who(str(path), path.stat().st_mtime_ns)
        except (OSError, pydicom.errors.InvalidDicomError, ValueError, AttributeError, KeyError):
            continue
    return "", "", ""


def _who_cells(ctx: ServiceContext, job_id: str) -> str:
    name, patient_id, date = _who(ctx, job_id)
    return f'<td class="patient">{_esc(name)}</td><td>{_esc(patient_id)}</td><td>{_esc(date)}</td>'


def _job(ctx: ServiceContext, job_id: str):
    job = ctx.store.get(job_id) if len(job_id) == 32 else None
    if job is None:
        raise HTTPException(404, f"no job {job_id!r}")
    return job


def _output_file(ctx: ServiceContext, job_id: str, kind: str) -> Path:
    """A finished job's output file, or 404/409 saying why there is none (as /jobs/{id}/...)."""
    job = _job(ctx, job_id)
    manifest = ctx.storage.output_manifest(job_id)
    if manifest is None:
        if job.state in ("done", "failed"):
            raise HTTPException(404, f"job {job_id} has no outputs ({job.state})")
        raise HTTPException(409, f"job {job_id} is {job.state}: outputs are not ready yet")
    entry = manifest["files"].get(kind)
    if entry is None:
        raise HTTPException(404, f"job {job_id} has no {kind} (computed before the results page existed?)")
    return ctx.storage.job_output(job_id) / entry["file"]


@functools.lru_cache(maxsize=4)
def _load_view(path: str, _mtime_ns: int) -> ViewVolumes:
    return ViewVolumes.load(path)


def _view(ctx: ServiceContext, job_id: str) -> ViewVolumes:
    path = _output_file(ctx, job_id, "view")
    return _load_view(str(path), path.stat().st_mtime_ns)


def _summary(ctx: ServiceContext, job_id: str) -> dict:
    return json.loads(_output_file(ctx, job_id, "summary_json").read_text())


def _identifiers(ctx: ServiceContext, job_id: str) -> dict:
    manifest = ctx.storage.output_manifest(job_id) or {"files": {}}
    for kind in ("rtdose", "doserate"):
        entry = manifest["files"].get(kind)
        if entry:
            return identifiers_from_header(pydicom.dcmread(ctx.storage.job_output(job_id) / entry["file"],
                                                           stop_before_pixels=True))
    return {}


def _provenance_html(summary: dict) -> str:
    prov, t, a = summary.get("provenance") or {}, summary.get("time") or {}, summary.get("activity") or {}
    items = [
        ("method", prov.get("method")), ("software", prov.get("software")),
        ("model (weights SHA-256)", prov.get("model_sha256") or "none (DVK)"),
        ("calibration", prov.get("calibration") or a.get("calibration")),
        ("time model", prov.get("time_model")), ("administration", t.get("administration")),
        ("acquisition", t.get("acquisition")), ("hours after administration", t.get("hours_since_administration")),
        ("injected activity (MBq)", a.get("injected_activity_mbq")), ("density curve", prov.get("density_curve")),
        ("dose grid", prov.get("dose_grid")), ("inputs SHA-256", prov.get("inputs_sha256")),
        ("regions", " ".join(str(v) for v in ((summary.get("regions_source") or {}).get("kind"),
                                              (summary.get("regions_source") or {}).get("method")) if v) or "none"),
    ]
    rows = "".join(f"<dt>{_esc(k)}</dt><dd>{_esc(v if v is not None else '-')}</dd>" for k, v in items)
    warnings = "".join(f'<li class="warning">{_esc(w)}</li>' for w in summary.get("warnings") or [])
    warnings += "".join(f'<li class="region-warning">{_esc(w)}</li>' for w in summary.get("region_warnings") or [])
    return f'<dl id="provenance">{rows}</dl>' + (f'<ul id="warnings">{warnings}</ul>' if warnings else "")


def _table_html(summary: dict) -> str:
    rows = summary.get("regions") or []
    if not rows:
        return f'<p id="regions-none">{_esc(summary.get("regions_error") or "no regions reported")}</p>'
    header, body = table_rows(rows)
    colours = region_colours(len(rows))
    head = "".join(f"<th>{_esc(h)}</th>" for h in header)
    lines = []
    for cells, colour, row in zip(body, colours, rows, strict=True):
        swatch = f'<span class="swatch" style="background:rgb{colour}"></span>'
        kind = "covered" if row.get("coverage") in (None, "covered") else "uncovered"
        lines.append(f'<tr class="{kind}"><td>{swatch}{_esc(cells[0])}</td>'
                     + "".join(f"<td>{_esc(c)}</td>" for c in cells[1:]) + "</tr>")
    return f'<table id="regions"><thead><tr>{head}</tr></thead><tbody>{"".join(lines)}</tbody></table>'


@router.get("/jobs/{job_id}")
def job_page(request: Request, ctx: Ctx, job_id: str):
    actor = session_actor(request)
    if actor is None:
        return _to_login(request)
    job = _job(ctx, job_id)
    if job.state != "done" or ctx.storage.output_manifest(job_id) is None:
        where = f", stage {job.stage} ({100 * (job.progress or 0):.0f} %)" if job.state == "running" else ""
        body = (f'<p id="job-state">Job {_esc(job_id)} is <b>{_esc(job.state)}</b>{_esc(where)}.</p>'
                + (f'<p class="reason">{_esc(job.reason)}</p>' if job.reason else "")
                + '<p><a href="">refresh</a> · <a href="/ui/jobs">all jobs</a></p>')
        return _page(f"Job {job_id[:12]}", body, actor=actor)
    summary = _summary(ctx, job_id)
    if "view" not in ctx.storage.output_manifest(job_id)["files"]:
        body = (f'<p id="job-state">Job {_esc(job_id)} is done, but its result has no view.npz (computed before '
                'the results page existed): recompute it to see it here. <a href="/ui/jobs">all jobs</a></p>'
                f"<section><h2>Regions</h2>{_table_html(summary)}</section>"
                f"<section><h2>Provenance</h2>{_provenance_html(summary)}</section>")
        return _page(f"Job {job_id[:12]}", body, actor=actor)
    view = _view(ctx, job_id)
    ident = _identifiers(ctx, job_id)
    lo, hi = default_window(view)
    levels = default_isodose_levels(view)
    point = key_point(view)
    config = {
        "job": job_id, "planes": {p: view.n_slices(p) for p in PLANES}, "start": dict(zip(PLANES, point, strict=True)),
        "unit": view.dose_unit, "max": float(view.dose.max()), "window": [lo, hi], "isodose": levels,
        "isodose_colours": [f"rgb{c}" for c in isodose_colours(levels)],
        "regions": [{"name": n, "colour": f"rgb{c}"} for n, c in
                    zip(view.region_names, region_colours(len(view.region_names)), strict=True)],
        "orientation": ORIENTATION,
    }
    config_json = json.dumps(config).replace("<", "\\u003c")  # nothing in it can close the script element
    panels = "".join(
        f'<figure class="panel"><figcaption>{p} <span id="{p}-label"></span></figcaption><div class="slice">'
        f'<img id="{p}-img" alt="{p} slice" data-plane="{p}">'
        + "".join(f'<span class="orient {edge}" id="{p}-orient-{edge}">{letter}</span>'
                  for edge, letter in zip(("top", "bottom", "left", "right"), ORIENTATION[p], strict=True))
        + '</div>'
        f'<input type="range" id="{p}-slider" min="0" max="{view.n_slices(p) - 1}" value="{point[i]}" '
        f'aria-label="{p} slice"></figure>' for i, p in enumerate(PLANES))
    who = (f"{_esc(ident.get('patient_name') or '(no name)')} · ID {_esc(ident.get('patient_id') or '-')} · "
           f"study {_esc(_iso_date(ident.get('study_date')) or '-')} · accession {_esc(ident.get('accession_number') or '-')}")
    body = f"""<section id="who"><p>{who}</p><p class="links"><a href="/ui/jobs/{job_id}/report.pdf" id="report-link">PDF report</a>
· <a href="/ui/jobs/{job_id}/summary.json">summary.json</a> · <a href="/ui/jobs">all jobs</a></p></section>
<section id="controls">
<label>opacity <input type="range" id="opacity" min="0" max="100" value="50"></label>
<label>dose window <input type="number" id="win-lo" step="any" value="{lo:.4g}"> to
<input type="number" id="win-hi" step="any" value="{hi:.4g}"> {_esc(view.dose_unit)}</label>
<label>isodose lines ({_esc(view.dose_unit)}) <input type="text" id="isodose" value="{', '.join(f'{x:g}' for x in levels)}" size="16"></label>
<label><input type="checkbox" id="show-regions" checked> region outlines</label>
<span id="legend"></span></section>
<section id="maximum">{''.join(f"<p>{_esc(line)}</p>" for line in headline_lines(summary))}</section>
<p id="cursor">dose under the cursor: <span id="cursor-value">move the pointer over an image</span></p>
<section id="viewer">{panels}</section>
<section id="numbers"><div><h2>DVH</h2><img id="dvh-img" src="/ui/jobs/{job_id}/dvh.png" alt="cumulative DVHs"></div>
<div><h2>Regions</h2>{_table_html(summary)}</div></section>
<section><h2>Provenance</h2>{_provenance_html(summary)}</section>
<script id="view-config" type="application/json">{config_json}</script>
<script src="/ui/static/app.js"></script>"""
    return _page(f"Job {job_id[:12]}", body, actor=actor)


def _levels(text: str | None) -> list[float] | None:
    if text is None:
        return None
    levels = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            value = float(part)
        except ValueError as exc:
            raise HTTPException(422, f"isodose levels are numbers separated by commas, got {part.strip()!r}") from exc
        if not (math.isfinite(value) and value > 0):
            raise HTTPException(422, f"isodose levels must be positive, got {value}")
        levels.append(value)
    if len(levels) > _MAX_ISODOSE_LEVELS:
        raise HTTPException(422, f"at most {_MAX_ISODOSE_LEVELS} isodose levels")
    return sorted(levels)


@router.get("/jobs/{job_id}/slice/{plane}/{index}.png")
def slice_png(
    ctx: Ctx, _viewer: Viewer, job_id: str, plane: str, index: int,
    opacity: Annotated[float, Query(ge=0, le=1)] = 0.5,
    lo: Annotated[float | None, Query(allow_inf_nan=False)] = None,
    hi: Annotated[float | None, Query(allow_inf_nan=False)] = None,
    iso: Annotated[str | None, Query(max_length=200)] = None,
    regions: Annotated[bool, Query()] = True,
):
    if plane not in PLANES:
        raise HTTPException(404, f"no plane {plane!r}: use one of {', '.join(PLANES)}")
    view = _view(ctx, job_id)
    if not 0 <= index < view.n_slices(plane):
        raise HTTPException(404, f"{plane} slice {index} is outside 0..{view.n_slices(plane) - 1}")
    default_lo, default_hi = default_window(view)
    window = (default_lo if lo is None else lo, default_hi if hi is None else hi)
    if not window[1] > window[0]:
        raise HTTPException(422, f"the dose window needs hi above lo, got {window[0]:g}..{window[1]:g}")
    rgb = render_slice(view, plane, index, opacity=opacity, window=window, isodose_levels=_levels(iso), regions=regions)
    return Response(png_bytes(rgb), media_type="image/png", headers=_HEADERS)


@router.get("/jobs/{job_id}/point/{plane}/{index}")
def point_value(ctx: Ctx, _viewer: Viewer, job_id: str, plane: str, index: int,
                u: Annotated[float, Query(ge=0, le=1)], v: Annotated[float, Query(ge=0, le=1)]):
    """The dose (or dose rate), CT number and regions at a point of a slice picture, given as
    fractions of its width (``u``) and height (``v``): the page's dose under the cursor."""
    if plane not in PLANES:
        raise HTTPException(404, f"no plane {plane!r}: use one of {', '.join(PLANES)}")
    view = _view(ctx, job_id)
    if not 0 <= index < view.n_slices(plane):
        raise HTTPException(404, f"{plane} slice {index} is outside 0..{view.n_slices(plane) - 1}")
    dose2d = _slice2d(view.dose, plane, index)
    row = min(dose2d.shape[0] - 1, int(v * dose2d.shape[0]))
    col = min(dose2d.shape[1] - 1, int(u * dose2d.shape[1]))
    masks = _slice2d(view.region_masks, plane, index) if len(view.region_masks) else []
    regions = [name for name, mask in zip(view.region_names, masks, strict=False) if mask[row, col]]
    body = {"value": round(float(dose2d[row, col]), 4), "unit": view.dose_unit,
            "ct_hu": int(_slice2d(view.ct_hu, plane, index)[row, col]), "regions": regions}
    return Response(json.dumps(body), media_type="application/json", headers=_HEADERS)


def _slice2d(array, plane: str, index: int):
    return {"axial": lambda: array[..., index, :, :], "coronal": lambda: array[..., :, index, :],
            "sagittal": lambda: array[..., :, :, index]}[plane]()


@functools.lru_cache(maxsize=8)
def _dvh_png(path: str, _mtime_ns: int) -> bytes:
    import matplotlib
    from matplotlib.figure import Figure

    summary = json.loads(Path(path).read_text())
    rows = summary.get("regions") or []
    buf = io.BytesIO()
    with matplotlib.rc_context(TEXT_RC):  # region labels are text, never mathtext
        fig = Figure(figsize=(5.5, 3.6 + 0.12 * max(0, len(rows) - 10)), dpi=110)
        ax = fig.add_axes((0.12, 0.14, 0.85, 0.82))
        plot_dvh(ax, rows, absorbed=bool(summary.get("dose")), fontsize=8)
        fig.savefig(buf, format="png")
    return buf.getvalue()


@router.get("/jobs/{job_id}/dvh.png")
def dvh_png(ctx: Ctx, _viewer: Viewer, job_id: str):
    path = _output_file(ctx, job_id, "summary_json")
    return Response(_dvh_png(str(path), path.stat().st_mtime_ns), media_type="image/png", headers=_HEADERS)


@router.get("/jobs/{job_id}/summary.json")
def summary_json(ctx: Ctx, _viewer: Viewer, job_id: str):
    return Response(json.dumps(_summary(ctx, job_id), indent=2), media_type="application/json", headers=_HEADERS)


@router.get("/jobs/{job_id}/report.pdf")
def report_pdf(ctx: Ctx, _viewer: Viewer, job_id: str):
    path = _output_file(ctx, job_id, "report")
    return FileResponse(path, media_type="application/pdf", filename=f"{job_id}-report.pdf", headers=_HEADERS)
