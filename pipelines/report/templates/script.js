document.querySelectorAll('.cmp input').forEach(function (r) {
  r.addEventListener('input', function () {
    r.parentElement.querySelector('.over').style.clipPath = 'inset(0 ' + (100 - r.value) + '% 0 0)';
  });
});
document.querySelectorAll('.gallery').forEach(function (g) {
  g.querySelectorAll('.pager button').forEach(function (b) {
    b.addEventListener('click', function () {
      g.querySelectorAll('.page').forEach(function (p) {
        var show = p.dataset.page === b.dataset.goto;
        p.hidden = !show;
        if (show) p.querySelectorAll('img[data-src]').forEach(function (i) {
          i.src = i.dataset.src; i.removeAttribute('data-src');
        });
      });
      g.querySelectorAll('.pager button').forEach(function (o) { o.classList.toggle('current', o === b); });
    });
  });
});
