// Typeset the page's TeX with the bundled KaTeX (tools/build_site.py loads this after katex and auto-render).
document.addEventListener("DOMContentLoaded", function () {
  renderMathInElement(document.querySelector("main.content"), {
    delimiters: [
      {left: "$$", right: "$$", display: true},
      {left: "\\[", right: "\\]", display: true},
      {left: "$", right: "$", display: false},
      {left: "\\(", right: "\\)", display: false}
    ],
    ignoredTags: ["script", "noscript", "style", "textarea", "pre", "code"],
    throwOnError: false
  });
  document.body.setAttribute("data-math", "done");
});
