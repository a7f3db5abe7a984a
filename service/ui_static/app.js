// The results page: swaps the server-drawn slice pictures as the controls change.
// No library and nothing from the internet; the settings come from #view-config.
(function () {
  "use strict";
  const config = JSON.parse(document.getElementById("view-config").textContent);
  const planes = Object.keys(config.planes);
  const $ = (id) => document.getElementById(id);
  const state = { index: Object.assign({}, config.start) };
  let timer = null;

  function query() {
    const p = new URLSearchParams();
    p.set("opacity", ($("opacity").value / 100).toFixed(2));
    const lo = parseFloat($("win-lo").value), hi = parseFloat($("win-hi").value);
    if (isFinite(lo) && isFinite(hi) && hi > lo) { p.set("lo", lo); p.set("hi", hi); }
    p.set("iso", $("isodose").value.split(/[ ,;]+/).filter((x) => x && isFinite(parseFloat(x)) && parseFloat(x) > 0).join(","));
    p.set("regions", $("show-regions").checked ? "1" : "0");
    return p.toString();
  }

  function draw(plane) {
    const i = state.index[plane];
    $(plane + "-slider").value = i;
    $(plane + "-label").textContent = (i + 1) + " / " + config.planes[plane];
    $(plane + "-img").src = "/ui/jobs/" + config.job + "/slice/" + plane + "/" + i + ".png?" + query();
  }

  function drawAll() { planes.forEach(draw); }
  function later() { clearTimeout(timer); timer = setTimeout(drawAll, 150); }

  planes.forEach(function (plane) {
    $(plane + "-slider").addEventListener("input", function (e) {
      state.index[plane] = parseInt(e.target.value, 10);
      draw(plane);
    });
    $(plane + "-img").addEventListener("wheel", function (e) {
      e.preventDefault();
      const n = config.planes[plane];
      state.index[plane] = Math.min(n - 1, Math.max(0, state.index[plane] + (e.deltaY > 0 ? 1 : -1)));
      draw(plane);
    }, { passive: false });
  });
  ["opacity", "win-lo", "win-hi", "isodose", "show-regions"].forEach(function (id) {
    $(id).addEventListener(id === "show-regions" ? "change" : "input", later);
  });

  const legend = $("legend");
  config.isodose.forEach(function (level, k) {
    const s = document.createElement("span");
    s.className = "iso";
    s.style.borderColor = config.isodose_colours[k];
    s.textContent = level + " " + config.unit;
    legend.appendChild(s);
  });
  config.regions.forEach(function (r) {
    const s = document.createElement("span");
    s.className = "region";
    s.style.borderColor = r.colour;
    s.textContent = r.name;
    legend.appendChild(s);
  });
  // The dose under the cursor: asked of the server for the voxel under the pointer (one request at a time).
  const cursor = $("cursor-value");
  let pending = null, busy = false;
  function ask() {
    if (busy || !pending) return;
    const q = pending; pending = null; busy = true;
    fetch("/ui/jobs/" + config.job + "/point/" + q.plane + "/" + state.index[q.plane] + "?u=" + q.u.toFixed(4) + "&v=" + q.v.toFixed(4),
          { credentials: "same-origin" })
      .then(function (r) { return r.ok ? r.json() : null; })
      .then(function (p) {
        if (p) {
          cursor.textContent = p.value.toPrecision(3) + " " + p.unit + " · CT " + p.ct_hu + " HU" +
            (p.regions.length ? " · " + p.regions.join(", ") : "") + " (" + q.plane + ")";
        }
      })
      .catch(function () {})
      .finally(function () { busy = false; ask(); });
  }
  planes.forEach(function (plane) {
    const img = $(plane + "-img");
    img.addEventListener("mousemove", function (e) {
      const box = img.getBoundingClientRect();
      if (box.width <= 0 || box.height <= 0) return;
      pending = { plane: plane, u: Math.min(1, Math.max(0, (e.clientX - box.left) / box.width)),
                  v: Math.min(1, Math.max(0, (e.clientY - box.top) / box.height)) };
      ask();
    });
  });
  drawAll();
})();
