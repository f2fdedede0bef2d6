(function () {
  "use strict";
  // Any script error, failed file load or blocked content marks the page as broken and says why.
  function report(message) {
    document.body.setAttribute("data-render", "error");
    var box = document.getElementById("js-errors");
    if (box) { box.hidden = false; box.textContent += String(message) + "\n"; }
  }
  window.addEventListener("error", function (event) {
    var target = event.target;
    report(target && target !== window && (target.src || target.href) ?
      "could not load " + (target.src || target.href) : event.message);
  }, true);
  document.addEventListener("securitypolicyviolation", function (event) {
    report("blocked by the page's security policy: " + event.blockedURI);
  });
})();
