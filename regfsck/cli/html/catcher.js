// Runs first: every error of the page (script errors, failed loads, CSP refusals,
// console.error) is counted on <html data-errors> and listed in #console-errors, so a
// headless browser's --dump-dom shows them (the scan --html test reads them there).
(function () {
  var errs = [];
  function show() {
    var el = document.getElementById('console-errors');
    if (el && errs.length) { el.textContent = errs.join('\n'); el.hidden = false; }
  }
  function add(message) {
    errs.push(String(message));
    document.documentElement.setAttribute('data-errors', String(errs.length));
    show();
  }
  window.addEventListener('error', function (e) {
    add('error: ' + (e.message || (e.target && e.target.tagName)));
  }, true);
  window.addEventListener('unhandledrejection', function (e) { add('unhandled rejection: ' + e.reason); });
  document.addEventListener('securitypolicyviolation', function (e) {
    add('CSP refused: ' + e.violatedDirective + ' ' + e.blockedURI);
  });
  var consoleError = console.error;
  console.error = function () {
    add(Array.prototype.join.call(arguments, ' '));
    return consoleError.apply(console, arguments);
  };
  document.addEventListener('DOMContentLoaded', show);
})();
