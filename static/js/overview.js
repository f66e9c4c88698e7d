// Overview charts (uPlot, vendored). Data comes from the page's json_script block.
document.addEventListener("DOMContentLoaded", () => {
  const data = JSON.parse(document.getElementById("chart-data").textContent);
  const width = (id) => Math.max(document.getElementById(id).clientWidth - 10, 280);
  // the page says "Times are UTC": draw the time axis and legend in UTC, not the browser's zone
  const utc = (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC");
  const common = { height: 200, tzDate: utc, scales: { x: { time: true } }, axes: [{}, { size: 50 }] };
  new uPlot({ ...common, width: width("chart-throughput"),
    series: [{}, { label: "started", stroke: "#1f5fbf", width: 2 }, { label: "failed", stroke: "#b3261e", width: 2 }] },
    [data.t, data.started, data.failed], document.getElementById("chart-throughput"));
  new uPlot({ ...common, width: width("chart-failures"),
    series: [{}, { label: "failure %", stroke: "#8a5a00", width: 2, spanGaps: true }] },
    [data.t, data.rate], document.getElementById("chart-failures"));
});
