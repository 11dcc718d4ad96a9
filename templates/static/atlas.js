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

// Layer grid: sort and filter the cells by their data- attributes, jump to a unit.
// Cells draw from sprite sheets by class, so moving them keeps their pictures.
function setUpGrid(form, grid) {
  const field = (name) => form.elements.namedItem(name);
  const cells = Array.from(grid.children); // in unit order: cells[n] is unit n
  const value = (cell, key) => {
    const v = parseFloat(cell.dataset[key]);
    return Number.isNaN(v) ? null : v;
  };
  const isDead = (cell) => cell.firstElementChild.classList.contains("dead");
  const keep = {
    all: () => true,
    live: (cell) => !isDead(cell),
    dead: isDead,
    low: (cell) => value(cell, "q") !== null && value(cell, "q") < 1,
    labelled: (cell) => "l" in cell.dataset,
    unlabelled: (cell) => !("l" in cell.dataset),
    poly: (cell) => "p" in cell.dataset,
  };
  const labelField = field("label");
  const labelled = (cell) => {
    const q = labelField ? labelField.value.trim().toLowerCase() : "";
    return !q || (cell.dataset.l || "").toLowerCase().includes(q);
  };

  function ordered() {
    const [key, direction] = field("sort").value.split("-");
    if (key === "unit") return cells;
    const sign = direction === "asc" ? 1 : -1;
    return cells.map((cell, unit) => [value(cell, key), unit, cell])
      .sort((a, b) => {
        if (a[0] === null || b[0] === null) return (a[0] === null) - (b[0] === null) || a[1] - b[1];
        return sign * (a[0] - b[0]) || a[1] - b[1]; // missing values last, ties by unit
      })
      .map((entry) => entry[2]);
  }

  function apply() {
    const show = keep[field("show").value] || keep.all;
    const order = ordered();
    let shown = 0;
    for (const cell of order) {
      cell.hidden = !show(cell) || !labelled(cell);
      shown += !cell.hidden;
    }
    const fragment = document.createDocumentFragment();
    fragment.append(...order);
    grid.append(fragment);
    field("count").value = `${shown} of ${cells.length} units shown`;
    const state = new URLSearchParams({ sort: field("sort").value, show: field("show").value });
    if (labelField && labelField.value.trim()) state.set("label", labelField.value.trim());
    try {
      history.replaceState(null, "", `#${state}`);
    } catch (error) {
      // some browsers refuse history changes on file: pages; the view still works
    }
  }

  function choose(name, option) {
    const select = field(name);
    if (option && Array.from(select.options).some((o) => o.value === option)) select.value = option;
  }

  const saved = new URLSearchParams(window.location.hash.slice(1));
  choose("sort", saved.get("sort"));
  choose("show", saved.get("show"));
  if (labelField && saved.get("label")) labelField.value = saved.get("label");
  form.addEventListener("change", (event) => {
    if (event.target.tagName === "SELECT") apply();
  });
  if (labelField) labelField.addEventListener("input", apply);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const cell = cells[parseInt(field("unit").value, 10)];
    if (!cell) {
      field("count").value = `no unit ${field("unit").value}: units are 0 to ${cells.length - 1}`;
      return;
    }
    if (cell.hidden) {
      field("show").value = "all";
      apply();
    }
    cell.scrollIntoView({ block: "center" });
    cell.firstElementChild.focus();
  });
  form.hidden = false;
  apply();
}

document.addEventListener("DOMContentLoaded", () => {
  const form = document.getElementById("grid-controls");
  const grid = document.querySelector("ol.grid");
  if (form && grid) setUpGrid(form, grid);
});

// Search box: layers by name, units by id ("layer3.2:17"), classes by name, from the
// search.js index each model writes (a script, since fetch() of local files fails
// under file://). Hrefs are built from the page's data-root, so they stay relative.
const MAX_HITS = 12;

function searchHits(models, query, root) {
  const q = query.trim().toLowerCase();
  if (!q) return [];
  const hits = [];
  const unit = /^(.*?)\s*:\s*(\d+)$/.exec(q);
  for (const m of models) {
    const base = `${root}${m.slug}/`;
    const tag = models.length > 1 ? ` (${m.name})` : "";
    if (unit) {
      const c = Number(unit[2]);
      for (const [name, slug, channels] of m.layers) {
        if (name.toLowerCase() === unit[1] && c < channels)
          hits.push({ label: `${name}:${c}${tag}`, href: `${base}${slug}/${c}.html` });
      }
    }
    for (const [name, slug, channels] of m.layers) {
      if (name.toLowerCase().includes(q))
        hits.push({ label: `layer ${name}, ${channels} units${tag}`, href: `${base}${slug}/index.html` });
    }
    for (const [label, entry] of Object.entries(m.unitLabels || {})) {
      if (!label.toLowerCase().includes(q)) continue;
      for (const [i, c] of entry.units) {
        const [name, slug] = m.layers[i];
        hits.push({ label: `${name}:${c}, labelled ${label}${tag}`, href: `${base}${slug}/${c}.html` });
      }
      for (const [i, n] of entry.layers) {
        const [name, slug] = m.layers[i];
        const filter = new URLSearchParams({ sort: "unit", show: "labelled", label });
        hits.push({ label: `${n} unit${n > 1 ? "s" : ""} of ${name} labelled ${label}${tag}`,
                    href: `${base}${slug}/index.html#${filter}` });
      }
    }
    m.classes.forEach((name, k) => {
      if (!name.toLowerCase().includes(q)) return;
      if (m.logits) {
        hits.push({ label: `class ${name}: unit ${k} of the output${tag}`, href: `${base}${m.logits}/${k}.html` });
      }
      const at = m.labels.indexOf(k);  // labels of the explained images, whose rows are m.images
      if (at >= 0) hits.push({ label: `class ${name}: an image of it${tag}`, href: `${base}images/${m.images[at]}.html` });
    });
  }
  return hits.slice(0, MAX_HITS);
}

// The search form is built here rather than written into every page: it works only
// with scripts anyway, and a unit page is one of tens of thousands.
function searchForm(header) {
  const form = document.createElement("form");
  form.className = "search";
  form.setAttribute("role", "search");
  const input = document.createElement("input");
  Object.assign(input, { type: "search", name: "q", autocomplete: "off", spellcheck: false,
    placeholder: "Search: layer, layer:unit, class" });
  input.setAttribute("aria-label", "Search layers, units and classes");
  const list = document.createElement("ol");
  list.className = "hits";
  list.setAttribute("aria-live", "polite");
  form.append(input, list);
  header.append(form);
  return form;
}

function setUpSearch(header) {
  const form = searchForm(header);
  const input = form.elements.namedItem("q");
  const list = form.querySelector(".hits");
  const root = header.dataset.root;
  let hits = [];
  input.addEventListener("input", () => {
    hits = searchHits(window.atlasModels || [], input.value, root);
    list.replaceChildren(...hits.map((hit) => {
      const item = document.createElement("li");
      const link = document.createElement("a");
      link.href = hit.href;
      link.textContent = hit.label; // text, never HTML: names come from the store
      item.append(link);
      return item;
    }));
    if (input.value.trim() && !hits.length) {
      const item = document.createElement("li");
      item.textContent = "no match";
      list.append(item);
    }
  });
  form.addEventListener("submit", (event) => {
    event.preventDefault(); // the site is static: Enter opens the first hit
    if (hits.length) window.location.href = list.querySelector("a").href;
  });
}

document.addEventListener("DOMContentLoaded", () => {
  const header = document.querySelector("header.top[data-root]");
  if (header && window.atlasModels) setUpSearch(header);
});

// Activation atlas: zoom the picture (buttons, + and -), keeping the middle of the view in place;
// past data-label-zoom every cell shows its class.
const ZOOMS = [1, 1.5, 2, 3, 4, 6, 8];

function setUpAtlasZoom(tools, view, map) {
  let level = 0;
  const labelAt = parseFloat(map.dataset.labelZoom) || 2;
  function zoomTo(next) {
    next = Math.max(0, Math.min(ZOOMS.length - 1, next));
    const ratio = ZOOMS[next] / ZOOMS[level];
    const middleX = view.scrollLeft + view.clientWidth / 2;
    const middleY = view.scrollTop + view.clientHeight / 2;
    level = next;
    map.style.setProperty("--zoom", ZOOMS[level]);
    map.classList.toggle("labelled", ZOOMS[level] >= labelAt);
    view.scrollLeft = middleX * ratio - view.clientWidth / 2;
    view.scrollTop = middleY * ratio - view.clientHeight / 2;
    tools.querySelector("output").value = `zoom ${ZOOMS[level]}×`;
  }
  const steps = { in: () => level + 1, out: () => level - 1, fit: () => 0 };
  tools.addEventListener("click", (event) => {
    const step = steps[event.target.dataset.zoom];
    if (step) zoomTo(step());
  });
  document.addEventListener("keydown", (event) => {
    if (event.target.closest("input, textarea, select")) return;
    if (event.key === "+" || event.key === "=") zoomTo(level + 1);
    if (event.key === "-") zoomTo(level - 1);
  });
  tools.hidden = false;
  const saved = ZOOMS.indexOf(parseFloat(new URLSearchParams(window.location.hash.slice(1)).get("zoom")));
  zoomTo(saved > 0 ? saved : 0);
}

document.addEventListener("DOMContentLoaded", () => {
  const tools = document.querySelector(".aa-tools");
  const view = document.querySelector(".aa-view");
  const map = document.querySelector(".aa-map");
  if (tools && view && map) setUpAtlasZoom(tools, view, map);
});
