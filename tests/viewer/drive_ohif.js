// Open a study in OHIF as a radiologist would, open the SR series, and report what is shown.
// Usage: node drive_ohif.js CONFIG_JSON   (url, studyUID, outDir, chromium, puppeteerDir, label; query:
// appended to the viewer URL, e.g. "&token=..." for a data source that wants a bearer token)
// Prints one JSON line: {ok, annotations, svgText, overlay, body, viewports, screenshots, steps, errors}.
'use strict';
const path = require('path');
const cfg = JSON.parse(process.argv[2]);
const puppeteer = require(path.join(cfg.puppeteerDir, 'node_modules', 'puppeteer-core'));

const sleep = ms => new Promise(r => setTimeout(r, ms));
const steps = [];
const errors = [];

async function clickButtonByText(page, texts) {
  // Tour and dialog buttons: Shepherd (".shepherd-button") and OHIF dialogs use <button>.
  return page.evaluate(wanted => {
    const buttons = [...document.querySelectorAll('button, .shepherd-button, [role="button"]')];
    for (const b of buttons) {
      const t = (b.innerText || b.textContent || '').trim();
      if (wanted.some(w => t.toLowerCase() === w.toLowerCase()) && b.offsetParent !== null) {
        b.click();
        return t;
      }
    }
    const cancel = document.querySelector('.shepherd-cancel-icon');
    if (cancel) { cancel.click(); return 'shepherd-cancel-icon'; }
    return null;
  }, texts);
}

async function dismissPopups(page, rounds) {
  for (let i = 0; i < rounds; i++) {
    const clicked = await clickButtonByText(page, ['Skip all', 'Skip', 'Close', 'Got it', 'Confirm and Hide', 'Confirm', 'Dismiss', 'No', 'Cancel']);
    if (clicked) { steps.push(`clicked ${clicked}`); await sleep(400); } else { await sleep(250); }
  }
}

async function waitPainted(page, what) {
  // the viewport canvas is no longer all black: the image is decoded and drawn (at most 40 s)
  try {
    await page.waitForFunction(() => {
      const c = [...document.querySelectorAll('canvas')].find(x => x.width > 200);
      if (!c) return false;
      const d = document.createElement('canvas'); d.width = 64; d.height = 64;
      const g = d.getContext('2d'); g.drawImage(c, 0, 0, 64, 64);
      const px = g.getImageData(0, 0, 64, 64).data;
      let lit = 0; for (let i = 0; i < px.length; i += 4) if (px[i] + px[i + 1] + px[i + 2] > 30) lit++;
      return lit > 200;
    }, { timeout: 40000, polling: 500 });
    steps.push(what);
    return true;
  } catch (e) { errors.push(`${what}: not within 40 s`); return false; }
}

(async () => {
  const browser = await puppeteer.launch({
    executablePath: cfg.chromium,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      `--user-data-dir=${cfg.userDataDir}`, '--window-size=1600,1000'],
    defaultViewport: { width: 1600, height: 1000 },
  });
  const result = { ok: false, screenshots: [], steps, errors };
  try {
    const page = await browser.newPage();
    page.on('pageerror', e => errors.push(String(e).slice(0, 300)));
    page.on('console', m => { if (m.type() === 'error') errors.push(('console: ' + m.text()).slice(0, 300)); });
    page.on('requestfailed', r => errors.push(('requestfailed: ' + (r.failure() && r.failure().errorText) + ' ' + r.url().slice(-60))));
    page.on('response', r => { if (r.status() >= 400) errors.push(`HTTP ${r.status()} ${r.request().method()} ${r.url().replace(/token=[^&]*/, 'token=...').slice(-90)}`); });
    await page.goto(`${cfg.url}/viewer?StudyInstanceUIDs=${cfg.studyUID}${cfg.query || ''}`, { waitUntil: 'domcontentloaded', timeout: 60000 });
    steps.push('loaded viewer');
    // wait for the study browser thumbnails
    await page.waitForFunction(() => document.querySelectorAll('[data-cy^="study-browser-thumbnail"]').length >= 2, { timeout: 60000 });
    steps.push('thumbnails shown');
    await dismissPopups(page, 8);
    await waitPainted(page, 'first image painted');
    const shot0 = path.join(cfg.outDir, `${cfg.label}-0-study.png`);
    await page.screenshot({ path: shot0 }); result.screenshots.push(shot0);
    // open the SR series: double-click its thumbnail (the one described as SR)
    const opened = await page.evaluate(() => {
      const thumbs = [...document.querySelectorAll('[data-cy^="study-browser-thumbnail"]')];
      const sr = thumbs.find(t => /\bSR\b/.test(t.innerText || ''));
      if (!sr) return thumbs.map(t => (t.innerText || '').replace(/\s+/g, ' ')).join(' | ');
      sr.scrollIntoView();
      const ev = new MouseEvent('dblclick', { bubbles: true, cancelable: true, view: window });
      sr.dispatchEvent(ev);
      return 'ok';
    });
    steps.push(`open SR: ${opened}`);
    await sleep(1500);
    await dismissPopups(page, 6);
    // the SR viewport draws the SCOORD as an SVG annotation; a late prompt (e.g. "track
    // measurements?") can hold it back, so keep dismissing pop-ups while waiting (at most 30 s)
    const drawn = () => page.evaluate(() => document.querySelectorAll('svg [data-annotation-uid], svg g[data-annotation-uid]').length > 0);
    const until = Date.now() + 30000;
    while (!(await drawn()) && Date.now() < until) await dismissPopups(page, 1);
    if (!(await drawn())) errors.push('no SVG annotation within 30 s');
    await waitPainted(page, 'SR image painted');
    await sleep(1000);
    const info = await page.evaluate(() => {
      const annotations = [...document.querySelectorAll('svg g[data-annotation-uid]')].map(g => g.getAttribute('data-annotation-uid'));
      const svgText = [...document.querySelectorAll('svg text')].map(t => t.textContent).filter(Boolean);
      const overlay = [...document.querySelectorAll('.viewport-overlay, [class*="overlay"]')].map(e => e.innerText).join(' | ').replace(/\s+/g, ' ').slice(0, 2000);
      const body = document.body.innerText.replace(/\s+/g, ' ').slice(0, 4000);
      // what each cornerstone viewport shows: image index of how many, and its instance number
      const viewports = [];
      const cs = window.cornerstone;
      if (cs && cs.getEnabledElements) {
        for (const el of cs.getEnabledElements()) {
          const vp = el.viewport;
          if (!vp || !vp.getImageIds) continue;
          const ids = vp.getImageIds();
          const index = vp.getCurrentImageIdIndex ? vp.getCurrentImageIdIndex() : null;
          const imageId = index !== null ? ids[index] : null;
          const general = imageId && cs.metaData ? cs.metaData.get('generalImageModule', imageId) : null;
          const sop = imageId && cs.metaData ? cs.metaData.get('sopCommonModule', imageId) : null;
          viewports.push({ id: vp.id, type: vp.type, index, count: ids.length,
            instanceNumber: general ? general.instanceNumber : null,
            sopInstanceUID: sop ? sop.sopInstanceUID : null });
        }
      }
      return { annotations: [...new Set(annotations)], svgText, overlay, body, viewports };
    });
    Object.assign(result, info);
    const shot1 = path.join(cfg.outDir, `${cfg.label}-1-sr.png`);
    await page.screenshot({ path: shot1 }); result.screenshots.push(shot1);
    result.ok = info.annotations.length > 0;
  } catch (e) {
    errors.push(String(e).slice(0, 500));
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(result));
})();
