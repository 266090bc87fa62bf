// The treemap of `regfsck scan --html`: squarified, drawn as SVG from the JSON data block.
// Names only ever reach the page through textContent (never innerHTML).
(function () {
  'use strict';
  var data = JSON.parse(document.getElementById('data').textContent);
  var svg = document.getElementById('map');
  var W = 960, H = 440, NS = 'http://www.w3.org/2000/svg';
  var back = document.getElementById('back');
  var crumb = document.getElementById('crumb');
  var detail = document.getElementById('detail');
  var legend = document.getElementById('legend');
  var PALETTE = ['#2f6db5', '#2e8b57', '#8e44ad', '#c0392b', '#d35400', '#16a085', '#7f8c8d',
                 '#2c3e50', '#b7950b', '#6d4c41'];
  var PART = {tag: '#2f6db5', tags: '#16a085', shared: '#9cbbe3', untagged: '#d35400'};

  function bytes(n) {
    var units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'], i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
    return i ? n.toFixed(1) + ' ' + units[i] : n + ' B';
  }

  function el(name, attrs, parent) {
    var e = document.createElementNS(NS, name);
    Object.keys(attrs).forEach(function (k) { e.setAttribute(k, attrs[k]); });
    if (parent) { parent.appendChild(e); }
    return e;
  }

  // Bruls, Huizing, van Wijk: lay rows along the shorter side while the worst aspect improves.
  function worst(row, side) {
    var s = 0, mx = 0, mn = Infinity;
    row.forEach(function (r) { s += r.area; mx = Math.max(mx, r.area); mn = Math.min(mn, r.area); });
    return Math.max(side * side * mx / (s * s), (s * s) / (side * side * mn));
  }

  function squarify(items, x, y, w, h) {
    var total = 0;
    items.forEach(function (i) { total += i.value; });
    var rest = items.filter(function (i) { return i.value > 0; })
      .map(function (i) { return {item: i, area: i.value * w * h / total}; });
    var out = [];
    while (rest.length) {
      var side = Math.min(w, h), row = [];
      while (rest.length) {
        var candidate = row.concat([rest[0]]);
        if (row.length && worst(candidate, side) > worst(row, side)) { break; }
        row = candidate;
        rest.shift();
      }
      var s = 0;
      row.forEach(function (r) { s += r.area; });
      if (w >= h) {
        var cw = s / h, cy = y;
        row.forEach(function (r) { var rh = r.area / cw; out.push({item: r.item, x: x, y: cy, w: cw, h: rh}); cy += rh; });
        x += cw; w -= cw;
      } else {
        var rh2 = s / w, cx = x;
        row.forEach(function (r) { var rw = r.area / rh2; out.push({item: r.item, x: cx, y: y, w: rw, h: rh2}); cx += rw; });
        y += rh2; h -= rh2;
      }
    }
    return out;
  }

  function label(g, box, lines) {
    if (box.w < 40 || box.h < 18) { return; }
    var max = Math.floor((box.w - 8) / 7.5);
    lines.forEach(function (text, n) {
      if (box.h < 18 + n * 15) { return; }
      var t = el('text', {x: box.x + 4, y: box.y + 14 + n * 15}, g);
      t.textContent = text.length > max ? text.slice(0, Math.max(1, max - 1)) + '\u2026' : text;
    });
  }

  function clear() {
    while (svg.firstChild) { svg.removeChild(svg.firstChild); }
    while (detail.firstChild) { detail.removeChild(detail.firstChild); }
  }

  function node(box, fill, title, open) {
    var g = el('g', open ? {tabindex: '0', 'class': 'open', role: 'button'} : {}, svg);
    el('rect', {'class': 'outer', x: box.x, y: box.y, width: Math.max(0, box.w), height: Math.max(0, box.h),
                fill: fill, stroke: '#fff', 'stroke-width': 1}, g);
    el('title', {}, g).textContent = title;
    if (open) {
      g.addEventListener('click', open);
      g.addEventListener('keydown', function (e) {
        if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); open(); }
      });
    }
    return g;
  }

  // Many repositories: the first level groups them by their first path component.
  var GROUPS = {}, ORDER = [];
  data.repos.forEach(function (r, i) {
    var key = r.name.indexOf('/') > 0 ? r.name.slice(0, r.name.indexOf('/')) : r.name;
    if (!GROUPS[key]) { GROUPS[key] = []; ORDER.push(key); }
    GROUPS[key].push(i);
  });
  var GROUPED = data.repos.length > 30 && ORDER.length > 1;
  function groupOf(i) {
    var name = data.repos[i].name;
    return name.indexOf('/') > 0 ? name.slice(0, name.indexOf('/')) : name;
  }
  var backTo = null;

  function repoNode(b, i, prefix) {
    var r = data.repos[i], total = r.unique + r.shared;
    var short = prefix && r.name.indexOf(prefix) === 0 ? r.name.slice(prefix.length) : r.name;
    var g = node(b, PART.shared, r.name + '\n' + bytes(r.unique) + ' only here, ' + bytes(r.shared) +
                 ' shared with other repositories', function () { repo(i); });
    split(g, b, total ? r.unique / total : 0, PALETTE[i % PALETTE.length]);
    label(g, b, [short, bytes(total)]);
  }

  function split(g, b, f, color) {
    var part = b.w >= b.h ? {x: b.x, y: b.y, width: b.w * f, height: b.h}
                          : {x: b.x, y: b.y, width: b.w, height: b.h * f};
    part.fill = color;
    part.stroke = '#fff';
    el('rect', part, g);
  }

  function extras(items) {
    data.extra.forEach(function (x) { items.push({value: x.bytes, extra: x}); });
  }

  function draw(items, prefix) {
    items.sort(function (a, b) { return b.value - a.value; });
    squarify(items, 0, 0, W, H).forEach(function (b) {
      var it = b.item;
      if (it.extra) {
        label(node(b, '#c5cad3', it.extra.label + ': ' + bytes(it.extra.bytes), null), b,
              [it.extra.label, bytes(it.extra.bytes)]);
      } else if (it.group !== undefined) {
        var key = it.group, unique = 0, total = 0;
        GROUPS[key].forEach(function (i) { unique += data.repos[i].unique; total += data.repos[i].unique + data.repos[i].shared; });
        var g = node(b, PART.shared, key + '/ (' + GROUPS[key].length + ' repositories)\n' + bytes(unique) +
                     ' only in one repository, ' + bytes(total - unique) + ' shared', function () { group(key); });
        split(g, b, total ? unique / total : 0, PALETTE[ORDER.indexOf(key) % PALETTE.length]);
        label(g, b, [key + '/ (' + GROUPS[key].length + ')', bytes(total)]);
      } else {
        repoNode(b, it.i, prefix);
      }
    });
  }

  function top() {
    clear();
    backTo = null;
    back.hidden = true;
    crumb.textContent = 'all repositories';
    legend.hidden = true;
    var items = [];
    if (GROUPED) {
      ORDER.forEach(function (key) {
        var members = GROUPS[key], value = 0;
        members.forEach(function (i) { value += data.repos[i].unique + data.repos[i].shared; });
        items.push(members.length === 1 ? {value: value, i: members[0]} : {value: value, group: key});
      });
    } else {
      data.repos.forEach(function (r, i) { items.push({value: r.unique + r.shared, i: i}); });
    }
    extras(items);
    draw(items);
  }

  function group(key) {
    clear();
    backTo = top;
    back.hidden = false;
    back.textContent = '\u2190 all repositories';
    legend.hidden = true;
    crumb.textContent = key + '/ (' + GROUPS[key].length + ' repositories)';
    draw(GROUPS[key].map(function (i) { return {value: data.repos[i].unique + data.repos[i].shared, i: i}; }),
         key + '/');
  }

  function repo(i) {
    var r = data.repos[i], key = groupOf(i);
    clear();
    var inGroup = GROUPED && GROUPS[key].length > 1;
    backTo = inGroup ? function () { group(key); } : top;
    back.textContent = '\u2190 ' + (inGroup ? key + '/' : 'all repositories');
    back.hidden = false;
    legend.hidden = false;
    crumb.textContent = r.name;
    var items = r.parts.map(function (p) { return {value: p.bytes, part: p}; });
    squarify(items, 0, 0, W, H).forEach(function (b) {
      var p = b.item.part, name = p.kind === 'tag' ? 'tag ' + p.label : p.label;
      label(node(b, PART[p.kind] || '#7f8c8d', name + ': ' + bytes(p.bytes), null), b, [name, bytes(p.bytes)]);
    });
    var caption = document.createElement('p');
    caption.textContent = r.images.length ? 'Tagged images of ' + r.name + ':' : 'No tagged images in ' + r.name + '.';
    detail.appendChild(caption);
    if (!r.images.length) { return; }
    var table = document.createElement('table'), head = table.createTHead().insertRow();
    ['tags', 'digest', 'image size', 'only this image'].forEach(function (c, n) {
      var th = document.createElement('th');
      th.textContent = c;
      if (n > 1) { th.className = 'num'; }
      head.appendChild(th);
    });
    var body = table.createTBody();
    r.images.forEach(function (img) {
      var row = body.insertRow();
      [img.tags.join(', '), img.digest.slice(0, 19), bytes(img.bytes), bytes(img.only)].forEach(function (c, n) {
        var td = row.insertCell();
        td.textContent = c;
        if (n > 1) { td.className = 'num'; }
        if (n === 1) { td.title = img.digest; }
      });
    });
    detail.appendChild(table);
  }

  back.addEventListener('click', function () { (backTo || top)(); });
  Array.prototype.forEach.call(document.querySelectorAll('a[data-repo]'), function (a) {
    a.addEventListener('click', function (e) {
      e.preventDefault();
      repo(Number(a.getAttribute('data-repo')));
      svg.scrollIntoView();
    });
  });
  var start = /^#repo=(\d+)$/.exec(window.location.hash);
  var startGroup = /^#group=(.+)$/.exec(window.location.hash);
  var wanted = startGroup ? decodeURIComponent(startGroup[1]) : null;
  if (start && data.repos[Number(start[1])]) {
    repo(Number(start[1]));
  } else if (wanted !== null && GROUPED && Object.prototype.hasOwnProperty.call(GROUPS, wanted)) {
    group(wanted);
  } else {
    top();
  }
  document.documentElement.setAttribute('data-ready', '1');
})();
