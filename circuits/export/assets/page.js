(function () {
  "use strict";
  var data = JSON.parse(document.getElementById("circuit-data").textContent);
  var details = document.getElementById("details");
  var nodeElements = Array.prototype.slice.call(document.querySelectorAll("#diagram g.node"));
  var edgeElements = Array.prototype.slice.call(document.querySelectorAll("#diagram path.edge"));
  var incoming = data.nodes.map(function () { return []; });
  var outgoing = data.nodes.map(function () { return []; });
  data.edges.forEach(function (edge) { incoming[edge.target].push(edge); outgoing[edge.source].push(edge); });

  function element(tag, className, text) {
    var made = document.createElement(tag);
    if (className) { made.className = className; }
    if (text !== undefined) { made.textContent = text; }
    return made;
  }
  function signed(value) { return (value >= 0 ? "+" : "") + Number(value).toPrecision(3); }
  function shownToken(token) { return String(token).replace(/\n/g, "\u21b5\n"); }

  var ERROR_TERM = "error term: the part of the activation at this hook that the dictionary does not " +
    "reconstruct, kept as a node so that the circuit stays exact";
  var DIRECT_EFFECT = "Direct effect through the unembedding only. This feature sits in layer ";
  function facts(node) {
    var list = element("dl", "facts");
    var isError = node.kind === "error";
    [["id", node.id], ["kind", isError ? "error term" : node.kind], ["hook", node.hook], ["layer", node.layer],
     ["index", isError ? "" : node.index],
     ["activation", node.activation === undefined || isError ? "" : Number(node.activation).toPrecision(4)],
     ["effect on target", node.effect_on_target === undefined ? "" : signed(node.effect_on_target)],
     ["label", node.label]].forEach(function (pair) {
      if (pair[1] === undefined || pair[1] === "") { return; }
      list.appendChild(element("dt", null, pair[0]));
      list.appendChild(element("dd", null, String(pair[1])));
    });
    return list;
  }
  function tokenChips(title, tokens, note) {
    var section = element("section", "tokens");
    section.appendChild(element("h3", null, title));
    if (note) { section.appendChild(element("p", "caveat", note)); }
    (tokens || []).forEach(function (token) { section.appendChild(element("span", "chip", JSON.stringify(token))); });
    return section;
  }
  function edgeList(title, edges, otherEnd) {
    var section = element("section", "edges");
    section.appendChild(element("h3", null, title + " (" + edges.length + ")"));
    edges.slice().sort(function (a, b) { return Math.abs(b.effect) - Math.abs(a.effect); }).slice(0, 12)
      .forEach(function (edge) {
        var row = element("div", "edge-row");
        row.appendChild(element("span", "effect " + (edge.effect < 0 ? "negative" : "positive"), signed(edge.effect)));
        var link = element("button", null, data.nodes[edge[otherEnd]].description);
        link.type = "button";
        link.addEventListener("click", function () { select(edge[otherEnd]); });
        row.appendChild(link);
        section.appendChild(row);
      });
    return section;
  }
  function directEffectNote(node) {
    var layers = Number(data.graph.n_layers);
    if (!(layers > 0) || !(node.layer < layers - 2)) { return ""; }
    return DIRECT_EFFECT + node.layer + " of " + layers + ", far from the output: later layers transform what " +
      "it writes, so these tokens say little about its role.";
  }
  function contextRow(context) {
    var row = element("div", "context");
    row.appendChild(element("span", "context-activation", Number(context.activation).toPrecision(3)));
    var text = element("span", "context-text");
    context.tokens.forEach(function (token, position) {
      text.appendChild(element(position === context.position ? "mark" : "span", null, shownToken(token)));
    });
    row.appendChild(text);
    return row;
  }
  function show(index) {
    var node = data.nodes[index];
    while (details.firstChild) { details.removeChild(details.firstChild); }
    details.setAttribute("data-node", node.id);
    details.appendChild(element("h2", null, node.description));
    details.appendChild(facts(node));
    if (node.kind === "error") { details.appendChild(element("p", "note", ERROR_TERM.replace("error term: the ", "The "))); }
    if (typeof node.dashboard === "string" && /^(file:|https?:|[^:]*$)/i.test(node.dashboard)) {
      var open = element("a", "dashboard-link", "Open its feature dashboard page");
      open.setAttribute("href", node.dashboard);
      details.appendChild(element("p", "note")).appendChild(open);
    }
    [["Fires most on", node.top_tokens], ["Promotes (direct logit effect)", node.promoted_tokens, true],
     ["Suppresses (direct logit effect)", node.suppressed_tokens, true]].forEach(function (entry) {
      if (entry[1] && entry[1].length) {
        details.appendChild(tokenChips(entry[0], entry[1], entry[2] ? directEffectNote(node) : ""));
      }
    });
    details.appendChild(edgeList("Inputs", incoming[index], "source"));
    details.appendChild(edgeList("Outputs", outgoing[index], "target"));
    if (node.contexts && node.contexts.length) {
      var section = element("section", "contexts");
      section.appendChild(element("h3", null, "Top-activating contexts"));
      node.contexts.forEach(function (context) { section.appendChild(contextRow(context)); });
      details.appendChild(section);
    }
    nodeElements.forEach(function (shape) {
      shape.classList.toggle("selected", Number(shape.getAttribute("data-index")) === index);
    });
    edgeElements.forEach(function (path) {
      var touches = Number(path.getAttribute("data-source")) === index ||
        Number(path.getAttribute("data-target")) === index;
      path.classList.toggle("faded", !touches);
    });
  }
  function select(index) {
    show(index);
    try {
      history.replaceState(null, "", "#node=" + encodeURIComponent(data.nodes[index].id));
    } catch (error) { /* some browsers refuse this for file: URLs */ }
  }
  function initialNode() {
    var match = /^#node=(.*)$/.exec(window.location.hash);
    if (match) {
      var wanted;
      try { wanted = decodeURIComponent(match[1]); } catch (error) { wanted = null; }
      for (var number = 0; number < data.nodes.length; number += 1) {
        if (data.nodes[number].id === wanted) { return number; }
      }
    }
    return data.target;
  }
  nodeElements.forEach(function (shape) {
    var index = Number(shape.getAttribute("data-index"));
    shape.addEventListener("click", function () { select(index); });
    shape.addEventListener("keydown", function (event) {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); select(index); }
    });
  });
  show(initialNode());
  document.body.setAttribute("data-render", "ok");
})();
