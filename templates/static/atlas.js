// Keyboard navigation: left/k = previous, right/j = next, u = up (pages mark these links with rel).
document.addEventListener("keydown", (event) => {
  if (event.altKey || event.ctrlKey || event.metaKey || event.shiftKey) return;
  if (event.target.closest("input, textarea, select, [contenteditable]")) return;
  const rel = { ArrowLeft: "prev", k: "prev", ArrowRight: "next", j: "next", u: "up" }[event.key];
  const link = rel && document.querySelector(`a[rel~="${rel}"]`);
  if (link) {
    event.preventDefault();
    window.location.href = link.href;
  }
});
