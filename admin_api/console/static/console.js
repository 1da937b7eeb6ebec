// fedobj console: small, dependency-light behaviour on top of server-rendered pages.
// htmx does the fragment swaps; this file adds confirmations, the live stream,
// the charts and the detect page's uploads and camera.
(function () {
  "use strict";
  const csrf = () => document.body.dataset.csrf || "";

  // Confirm destructive forms (progressive: without JS they simply submit).
  document.addEventListener("submit", (e) => {
    const form = e.target.closest("form[data-confirm]");
    if (form && !window.confirm(form.dataset.confirm)) e.preventDefault();
  });

  // Let htmx swap error responses: the server renders them as readable fragments.
  document.addEventListener("htmx:beforeSwap", (e) => {
    if (e.detail.xhr.status >= 400) {
      e.detail.shouldSwap = true;
      e.detail.isError = false;
    }
  });

  // ------------------------------------------------------------------ live
  function charts() {
    const data = document.getElementById("series-data");
    if (!data || !window.uPlot) return null;
    const made = {};
    const growthMarkers = (s) => ({
      hooks: {
        draw: [(u) => {
          const ctx = u.ctx;
          ctx.save();
          ctx.strokeStyle = "#b45309";
          ctx.setLineDash([6, 4]);
          ctx.lineWidth = 2;
          for (const r of s.grew_at || []) {
            const x = u.valToPos(r, "x", true);
            ctx.beginPath();
            ctx.moveTo(x, u.bbox.top);
            ctx.lineTo(x, u.bbox.top + u.bbox.height);
            ctx.stroke();
          }
          ctx.restore();
        }],
      },
    });
    function build(id, s, central, federated, label) {
      const el = document.getElementById(id);
      if (!el) return;
      el.textContent = "";
      const width = Math.max(el.clientWidth || 480, 280);
      const opts = {
        width, height: 240,
        scales: { x: { time: false } },
        axes: [{ label: "round", incrs: [1, 2, 5, 10, 20, 50, 100] }, { label }],
        series: [
          { label: "round" },
          { label: "central", stroke: "#1d4ed8", width: 2, points: { show: true } },
          { label: "federated", stroke: "#047857", width: 2, dash: [4, 3], points: { show: true } },
        ],
        plugins: [growthMarkers(s)],
      };
      made[id] = new uPlot(opts, [s.round, central, federated], el);
    }
    function render(s) {
      build("chart-accuracy", s, s.central_accuracy, s.federated_accuracy, "accuracy");
      build("chart-loss", s, s.central_loss, s.federated_loss, "loss");
      document.body.dataset.chartRounds = String(s.round.length);
    }
    render(JSON.parse(data.textContent));
    return async () => {
      const resp = await fetch("/overview/series", { headers: { Accept: "application/json" } });
      if (resp.ok) render(await resp.json());
    };
  }

  function live() {
    const el = document.querySelector("[data-live]");
    if (!el || !window.EventSource) return;
    const label = document.getElementById("live-label");
    const refreshChart = charts();
    const source = new EventSource(el.dataset.live);
    let first = true;
    source.addEventListener("open", () => { el.classList.add("on"); label.textContent = "live"; });
    source.addEventListener("error", () => { el.classList.remove("on"); label.textContent = "reconnecting…"; });
    source.addEventListener("change", () => {
      if (first) { first = false; return; } // the page was rendered from this state
      window.htmx && window.htmx.trigger(document.body, "fedobj-change");
      if (refreshChart) refreshChart();
    });
  }

  // ---------------------------------------------------------------- detect
  function detectPage() {
    const form = document.getElementById("detect-form");
    if (!form) return;
    const results = document.getElementById("results");
    const input = document.getElementById("images");
    const drop = document.getElementById("drop");

    async function send(files) {
      if (!files.length) {
        results.innerHTML = '<p class="error" role="alert">Choose at least one image.</p>';
        return;
      }
      const body = new FormData();
      for (const f of files) body.append("images", f, f.name || "camera.png");
      body.append("threshold", document.getElementById("threshold").value);
      body.append("top_k", document.getElementById("top_k").value);
      results.innerHTML = '<p class="muted">Detecting… (the first image for a new version waits for its ONNX export: seconds)</p>';
      try {
        const resp = await fetch("/detect", {
          method: "POST", body, headers: { "X-CSRF-Token": csrf(), "HX-Request": "true" },
        });
        const html = await resp.text();
        if (resp.headers.get("HX-Redirect")) { window.location = resp.headers.get("HX-Redirect"); return; }
        results.innerHTML = html;
      } catch (err) {
        results.innerHTML = '<p class="error" role="alert">The server did not answer: ' + String(err) + "</p>";
      }
    }
    form.addEventListener("submit", (e) => { e.preventDefault(); send(Array.from(input.files)); });
    ["dragenter", "dragover"].forEach((t) => drop.addEventListener(t, (e) => { e.preventDefault(); drop.classList.add("over"); }));
    ["dragleave", "drop"].forEach((t) => drop.addEventListener(t, () => drop.classList.remove("over")));
    drop.addEventListener("drop", (e) => { e.preventDefault(); send(Array.from(e.dataTransfer.files)); });

    const video = document.getElementById("camera");
    const canvas = document.getElementById("frame");
    const start = document.getElementById("camera-start");
    const capture = document.getElementById("camera-capture");
    const status = document.getElementById("camera-status");
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      status.textContent = "No camera is available in this browser: use the file input above.";
      start.disabled = true;
      return;
    }
    start.addEventListener("click", async () => {
      try {
        video.srcObject = await navigator.mediaDevices.getUserMedia({ video: true, audio: false });
        video.hidden = false;
        capture.disabled = false;
        status.textContent = "Camera on. Frame the object and capture.";
      } catch (err) {
        status.textContent = "The camera could not start (" + err.name + "): use the file input above.";
      }
    });
    capture.addEventListener("click", () => {
      canvas.width = video.videoWidth || 320;
      canvas.height = video.videoHeight || 240;
      canvas.getContext("2d").drawImage(video, 0, 0, canvas.width, canvas.height);
      canvas.toBlob((blob) => {
        if (blob) send([new File([blob], "camera-" + Date.now() + ".png", { type: "image/png" })]);
      }, "image/png");
    });
  }

  document.addEventListener("DOMContentLoaded", () => { live(); detectPage(); });
})();
