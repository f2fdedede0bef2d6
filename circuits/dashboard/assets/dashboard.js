(function () {
  "use strict";
  // Model text is only ever put into the page with textContent (never as markup).
  var SVG = "http://www.w3.org/2000/svg";
  var content = document.getElementById("content");

  function element(tag, className, text) {
    var made = document.createElement(tag);
    if (className) { made.className = className; }
    if (text !== undefined && text !== null) { made.textContent = String(text); }
    return made;
  }
  function link(href, text) { var a = element("a", null, text); a.setAttribute("href", href); return a; }
  function number(value, digits) { return Number(value).toPrecision(digits || 3); }
  function percent(value) {
    if (value === 0) { return "0%"; }
    return (100 * value < 0.01 ? (100 * value).toExponential(1) : (100 * value).toPrecision(2)) + "%";
  }
  function shown(token) { return String(token).replace(/\n/g, "\u21b5"); }
  function chip(text) { return element("span", "chip", JSON.stringify(String(text))); }

  // --- index -------------------------------------------------------------------------------------
  function readState() {
    var state = {sort: "index", desc: false, q: "", page: 0};
    location.hash.replace(/^#/, "").split("&").forEach(function (part) {
      var pair = part.split("=");
      if (pair.length !== 2) { return; }
      var value = decodeURIComponent(pair[1]);
      if (pair[0] === "sort" && /^-?(index|density|max|mean)$/.test(value)) {
        state.desc = value.charAt(0) === "-"; state.sort = value.replace(/^-/, "");
      } else if (pair[0] === "q") { state.q = value; }
      else if (pair[0] === "page" && /^[0-9]+$/.test(value)) { state.page = Number(value) - 1; }
    });
    return state;
  }
  function writeState(state) {
    location.hash = "sort=" + (state.desc ? "-" : "") + state.sort + "&page=" + (state.page + 1) +
      (state.q ? "&q=" + encodeURIComponent(state.q) : "");
  }
  var COLUMN = {index: 0, density: 1, max: 2, mean: 3};

  function renderIndex() {
    var data = window.DASHBOARD_INDEX;
    var state = readState();
    var query = state.q.toLowerCase();
    var rows = data.features.filter(function (row) {
      if (!query) { return true; }
      if (String(row[0]) === query.trim()) { return true; }
      return row[4].some(function (token) { return String(token).toLowerCase().indexOf(query) >= 0; });
    });
    var column = COLUMN[state.sort];
    rows.sort(function (a, b) {
      var order = a[column] - b[column] || a[0] - b[0];
      return state.desc ? -order : order;
    });
    var pages = Math.max(1, Math.ceil(rows.length / data.page_size));
    state.page = Math.min(Math.max(state.page, 0), pages - 1);
    content.textContent = "";
    var controls = element("div", "controls");
    var search = element("input");
    search.type = "search"; search.placeholder = "search top tokens (or a feature number)"; search.value = state.q;
    search.id = "search";
    search.addEventListener("change", function () { state.q = search.value; state.page = 0; writeState(state); });
    controls.appendChild(search);
    controls.appendChild(element("span", "count", rows.length + " of " + data.features.length + " features"));
    content.appendChild(controls);
    content.appendChild(pager(state, pages));
    var table = element("table", "features");
    var head = element("tr");
    [["index", "feature"], ["density", "density"], ["max", "max activation"], ["mean", "mean when firing"],
     [null, "top tokens"]].forEach(function (pair) {
      var cell = element("th");
      if (pair[0]) {
        var button = element("button", pair[0] === state.sort ? "sorted" : "",
                             pair[1] + (pair[0] === state.sort ? (state.desc ? " \u25bc" : " \u25b2") : ""));
        button.type = "button"; button.setAttribute("data-sort", pair[0]);
        button.addEventListener("click", function () {
          if (state.sort === pair[0]) { state.desc = !state.desc; } else { state.sort = pair[0]; state.desc = pair[0] !== "index"; }
          state.page = 0; writeState(state);
        });
        cell.appendChild(button);
      } else { cell.textContent = pair[1]; }
      head.appendChild(cell);
    });
    table.appendChild(head);
    rows.slice(state.page * data.page_size, (state.page + 1) * data.page_size).forEach(function (row) {
      var line = element("tr", "feature-row");
      var first = element("td");
      first.appendChild(link("features/" + row[0] + ".html", String(row[0])));
      line.appendChild(first);
      line.appendChild(element("td", "number", percent(row[1])));
      line.appendChild(element("td", "number", number(row[2])));
      line.appendChild(element("td", "number", number(row[3])));
      var tokens = element("td");
      row[4].forEach(function (token) { tokens.appendChild(chip(token)); });
      if (!row[4].length) { tokens.appendChild(element("span", "empty", "never fired")); }
      line.appendChild(tokens);
      table.appendChild(line);
    });
    content.appendChild(table);
    content.appendChild(pager(state, pages));
  }
  function pager(state, pages) {
    var bar = element("div", "pager");
    var previous = element("button", "previous", "\u2190 previous"), next = element("button", "next", "next \u2192");
    previous.type = next.type = "button";
    previous.disabled = state.page === 0; next.disabled = state.page >= pages - 1;
    previous.addEventListener("click", function () { state.page -= 1; writeState(state); });
    next.addEventListener("click", function () { state.page += 1; writeState(state); });
    bar.appendChild(previous);
    bar.appendChild(element("span", "page-number", "page " + (state.page + 1) + " of " + pages));
    bar.appendChild(next);
    return bar;
  }

  // --- feature page ------------------------------------------------------------------------------
  function contextRow(example, maximum) {
    var row = element("div", "context");
    row.appendChild(element("span", "context-activation", number(example.a)));
    var text = element("span", "context-text");
    example.t.forEach(function (token, i) {
      var value = example.v[i];
      var span = element("span", "token" + (value > 0 ? " active" : "") + (i === example.k ? " centre" : ""), shown(token));
      if (value > 0) {
        var alpha = Math.min(1, value / (maximum || 1));
        span.style.backgroundColor = "rgba(255, 140, 0, " + (0.12 + 0.88 * alpha).toFixed(3) + ")";
        span.title = number(value);
      }
      text.appendChild(span);
    });
    row.appendChild(text);
    row.title = "context " + example.c + ", position " + example.p;
    return row;
  }
  function histogram(data) {
    var counts = [data.below].concat(data.counts, [data.above]);
    var first = counts.findIndex(function (c) { return c > 0; });
    var last = counts.length - 1 - counts.slice().reverse().findIndex(function (c) { return c > 0; });
    var box = element("div", "histogram-box");
    if (first < 0) { box.appendChild(element("p", "empty", "never fired on the scanned tokens")); return box; }
    var width = 420, height = 150, bottom = 22, shown = counts.slice(first, last + 1);
    var peak = Math.max.apply(null, shown), barWidth = width / shown.length;
    var svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("class", "histogram"); svg.setAttribute("width", width); svg.setAttribute("height", height);
    svg.setAttribute("viewBox", "0 0 " + width + " " + height);
    var step = (data.high - data.low) / data.counts.length;
    function edge(binIndex) { return Math.pow(10, data.low + (binIndex - 1) * step); }  // 0: below the range
    shown.forEach(function (count, i) {
      var bar = document.createElementNS(SVG, "rect");
      var barHeight = count ? Math.max(1, (height - bottom - 4) * count / peak) : 0;
      bar.setAttribute("class", "bar"); bar.setAttribute("x", (i * barWidth).toFixed(2));
      bar.setAttribute("y", (height - bottom - barHeight).toFixed(2));
      bar.setAttribute("width", Math.max(barWidth - 1, 1).toFixed(2)); bar.setAttribute("height", barHeight.toFixed(2));
      var title = document.createElementNS(SVG, "title");
      var bin = first + i;
      title.textContent = count + " tokens, activation " + (bin === 0 ? "< " + number(edge(1), 2) :
        bin === counts.length - 1 ? ">= " + number(edge(bin), 2) : number(edge(bin), 2) + " to " + number(edge(bin + 1), 2));
      bar.appendChild(title);
      svg.appendChild(bar);
    });
    var axis = document.createElementNS(SVG, "line");
    axis.setAttribute("x1", 0); axis.setAttribute("x2", width);
    axis.setAttribute("y1", height - bottom); axis.setAttribute("y2", height - bottom);
    svg.appendChild(axis);
    [[0, "start", edge(Math.max(first, 1))], [width, "end", edge(Math.min(last + 1, counts.length - 1))]].forEach(function (t) {
      var label = document.createElementNS(SVG, "text");
      label.setAttribute("x", t[0]); label.setAttribute("y", height - 6); label.setAttribute("text-anchor", t[1]);
      label.textContent = number(t[2], 2);
      svg.appendChild(label);
    });
    box.appendChild(svg);
    box.appendChild(element("p", "band-label", "activation (log scale) of the tokens where it fires; " +
                            data.zero + " tokens at zero not shown"));
    return box;
  }
  function effectTable(title, pairs, className) {
    var section = element("div");
    section.appendChild(element("h3", null, title));
    var table = element("table", "effects");
    pairs.forEach(function (pair) {
      var row = element("tr");
      row.appendChild(element("td", null, JSON.stringify(String(pair[0]))));
      row.appendChild(element("td", className, (pair[1] >= 0 ? "+" : "") + number(pair[1])));
      table.appendChild(row);
    });
    section.appendChild(table);
    return section;
  }
  function renderFeature() {
    var key = document.body.getAttribute("data-feature");
    var data = (window.DASHBOARD_FEATURES || {})[key];
    if (!data) { throw new Error("no data for feature " + key + " (its data file is missing)"); }
    content.textContent = "";
    var nav = element("p", "nav");
    if (data.prev !== null) { nav.appendChild(link(data.prev + ".html", "\u2190 feature " + data.prev)); nav.appendChild(document.createTextNode(" \u00b7 ")); }
    nav.appendChild(link("../index.html", "all features"));
    if (data.next !== null) { nav.appendChild(document.createTextNode(" \u00b7 ")); nav.appendChild(link(data.next + ".html", "feature " + data.next + " \u2192")); }
    content.appendChild(nav);
    var grid = element("div", "grid");
    var left = element("div"), right = element("div");
    var facts = element("dl", "facts");
    [["feature", data.index], ["density", percent(data.density) + " of tokens (" + data.fired + ")"],
     ["max activation", number(data.max)], ["mean when firing", number(data.mean)]].forEach(function (pair) {
      facts.appendChild(element("dt", null, pair[0])); facts.appendChild(element("dd", null, pair[1]));
    });
    left.appendChild(facts);
    left.appendChild(element("h2", null, "Activation density"));
    left.appendChild(histogram(data.histogram));
    left.appendChild(element("h2", null, "Top-activating contexts"));
    var top = element("div", "top-contexts");
    data.top.forEach(function (example) { top.appendChild(contextRow(example, data.max)); });
    if (!data.top.length) { top.appendChild(element("p", "empty", "never fired on the scanned tokens")); }
    left.appendChild(top);
    left.appendChild(element("h2", null, "Examples across activation quantiles"));
    data.bands.slice().reverse().forEach(function (band) {
      var section = element("div", "band");
      section.appendChild(element("h3", null, "quantile " + Math.round(100 * band.from) + "\u2013" +
        Math.round(100 * band.to) + "% of firing tokens (sampled), activation " + number(band.low) + " to " + number(band.high)));
      band.examples.forEach(function (example) { section.appendChild(contextRow(example, data.max)); });
      left.appendChild(section);
    });
    right.appendChild(element("h2", null, "Top tokens"));
    var chips = element("div", "top-tokens");
    data.top_tokens.forEach(function (token) { chips.appendChild(chip(token)); });
    right.appendChild(chips);
    right.appendChild(element("h2", null, "Logit effects"));
    right.appendChild(element("p", "band-label", "direct effect only: the decoder direction through the final norm's weight and the " +
      "unembedding (for a feature far from the output, later layers transform what it writes)"));
    right.appendChild(effectTable("promoted", data.promoted, "positive"));
    right.appendChild(effectTable("suppressed", data.suppressed, "negative"));
    right.appendChild(element("h2", null, "Nearest features (decoder cosine)"));
    var list = element("ul", "nearest");
    data.nearest.forEach(function (entry) {
      var item = element("li");
      if (entry[2]) { item.appendChild(link(entry[0] + ".html", "feature " + entry[0])); }
      else { item.appendChild(element("span", null, "feature " + entry[0])); }
      item.appendChild(document.createTextNode(" " + number(entry[1]) + " "));
      (entry[3] || []).forEach(function (token) { item.appendChild(chip(token)); });
      list.appendChild(item);
    });
    right.appendChild(list);
    grid.appendChild(left); grid.appendChild(right);
    content.appendChild(grid);
  }

  var page = document.body.getAttribute("data-page");
  if (page === "index") {
    renderIndex();
    window.addEventListener("hashchange", renderIndex);
  } else if (page === "feature") {
    renderFeature();
  }
  document.body.setAttribute("data-render", "ok");
})();
