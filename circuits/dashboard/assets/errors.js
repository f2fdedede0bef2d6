window.addEventListener("error", function (event) {
  document.body.setAttribute("data-render", "error");
  var box = document.getElementById("js-errors");
  if (box) { box.hidden = false; box.textContent += String(event.message) + "\n"; }
});
