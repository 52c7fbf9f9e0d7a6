"""viewer.py in a real browser: Debian's headless Chromium, driven through Selenium, on a tiny synthetic base.

The viewer runs as its command line does (a subprocess on 127.0.0.1, a free port). `make test` installs
chromium and chromium-driver when they are missing; without them (and no way to install them) these
tests skip. Set EG3D_VIEWER_SCREENSHOT=docs/viewer.png to save the screenshot shown in the README.
"""
import base64
import io
import json
import os
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from click.testing import CliRunner
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

import dnnlib
import viewer
from test_viewer_backend import make_identity
from training import adapters
from training import synthetic_identity

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM, CHROMEDRIVER = shutil.which('chromium'), shutil.which('chromedriver')
needs_browser = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason=(
    'no chromium / chromedriver on PATH and they could not be installed here (make test installs them as root '
    'with apt-get install chromium chromium-driver)'))
TIMEOUT_S = 180  # one render takes seconds on a busy 2-core machine


@pytest.fixture(scope='module')
def files(tiny_identity, tmp_path_factory):
    folder = tmp_path_factory.mktemp('viewer_browser')
    base = tiny_identity / 'base.pkl'
    other = synthetic_identity.build_tiny_generator(seed=5)
    adapters.inject(other, adapters.AdapterConfig(r=1))
    adapters.save(other, str(folder / 'other_base.safetensors'))
    np.save(folder / 'smile.npy', np.random.RandomState(0).randn(1, 512).astype(np.float32))
    return dict(base=base, ann=make_identity(base, folder / 'ann.safetensors', 1),
                ben=make_identity(base, folder / 'ben.safetensors', 2), other=folder / 'other_base.safetensors',
                direction=folder / 'smile.npy', dataset=tiny_identity / 'train')


def start_viewer(args):
    """Run eg3d/viewer.py on a free port of 127.0.0.1; returns (process, url) once it listens."""
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / 'eg3d' / 'viewer.py'), '--port=0', *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT / 'eg3d')
    line = process.stdout.readline()  # the first line on stdout is the URL (errors go to stderr)
    if 'EG3D viewer at' not in line:
        process.kill()
        pytest.fail(f'viewer did not start: {line}{process.stderr.read()}')
    threading.Thread(target=process.stderr.read, daemon=True).start()  # drain: a full pipe would block it
    return process, line.split(' at ')[1].split()[0]


@pytest.fixture(scope='module')
def viewer_url(files):
    process, url = start_viewer(['--network', files['base'], '--adapter', files['ann'], '--adapter', files['ben'],
                                 '--dataset', files['dataset'], '--direction', files['direction'], '--nrr=16',
                                 '--device=cpu'])
    assert url.startswith('http://127.0.0.1:')
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope='module')
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ('--headless=new', '--no-sandbox', '--disable-dev-shm-usage', '--disable-gpu',
                     '--window-size=1280,860'):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def renders(driver) -> int:
    return int(driver.find_element(By.TAG_NAME, 'body').get_attribute('data-renders'))


def settle(driver, renders_before: int) -> None:
    """Wait until a render newer than `renders_before` finished and none is pending (or an error shows)."""
    def done(d):
        body = d.find_element(By.TAG_NAME, 'body')
        finished = int(body.get_attribute('data-renders')) > renders_before or d.find_element(By.ID, 'errors').text
        return finished and body.get_attribute('data-busy') == 'false'
    WebDriverWait(driver, TIMEOUT_S).until(done)


def shown(driver, image_id: str) -> np.ndarray:
    """The pixels of an <img> of the page (its PNG data URL, decoded)."""
    src = driver.find_element(By.ID, image_id).get_attribute('src')
    assert src.startswith('data:image/png;base64,'), src[:60]
    return np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(src.split(',', 1)[1]))).convert('RGB'))


def act(driver, action) -> None:
    """Do something on the page and wait for the render it causes."""
    before = renders(driver)
    action()
    settle(driver, before)
    assert driver.find_element(By.ID, 'errors').text == ''


def press(driver, element_id: str, key: str, times: int) -> None:
    driver.find_element(By.ID, element_id).send_keys(key * times)


def changed(a: np.ndarray, b: np.ndarray, by: float = 1.0) -> bool:
    """Mean absolute difference above `by` grey levels (a repeated view renders the very same pixels)."""
    return np.abs(a.astype(int) - b).mean() > by


@needs_browser
def test_viewer_in_a_browser(viewer_url, browser, files, tmp_path):
    browser.get(viewer_url)
    settle(browser, 0)
    assert browser.find_element(By.ID, 'errors').text == ''

    # The page shows the rendered face of the base beside the first identity.
    base, person = shown(browser, 'base-image'), shown(browser, 'person-image')
    assert base.shape == person.shape == (128, 128, 3)
    assert base.std() > 5 and person.std() > 5 and changed(base, person)
    assert browser.execute_script('return document.getElementById("person-image").naturalWidth') == 128
    assert Select(browser.find_element(By.ID, 'identity')).first_selected_option.get_attribute('value') == 'ann'

    # Changing the yaw changes the image.
    act(browser, lambda: press(browser, 'yaw', Keys.ARROW_RIGHT, 30))
    turned = shown(browser, 'person-image')
    assert float(browser.find_element(By.ID, 'yaw').get_attribute('value')) == pytest.approx(0.3)
    assert changed(turned, person)

    # Dragging a face turns the camera too.
    drag = ActionChains(browser).click_and_hold(browser.find_element(By.ID, 'person-image'))
    act(browser, lambda: drag.move_by_offset(-40, 0).release().perform())
    assert float(browser.find_element(By.ID, 'yaw').get_attribute('value')) == pytest.approx(0.5, abs=0.02)
    assert changed(shown(browser, 'person-image'), turned)
    act(browser, lambda: press(browser, 'yaw', Keys.ARROW_LEFT, 20))
    assert np.array_equal(shown(browser, 'person-image'), turned)

    # Switching the identity changes the personalized image, not the base.
    base_turned = shown(browser, 'base-image')
    act(browser, lambda: Select(browser.find_element(By.ID, 'identity')).select_by_value('ben'))
    assert changed(shown(browser, 'person-image'), turned)
    assert np.array_equal(shown(browser, 'base-image'), base_turned)

    # An alpha-space sample gives a new image.
    before = shown(browser, 'person-image')
    act(browser, lambda: browser.find_element(By.ID, 'alpha-sample').click())
    sample = shown(browser, 'person-image')
    assert changed(sample, before, by=0.2)  # the synthetic selfies' latents are close: so are their samples

    # An edit of strength 0 leaves the image unchanged; another strength does not.
    assert Select(browser.find_element(By.ID, 'direction')).first_selected_option.get_attribute('value') == 'smile'
    act(browser, lambda: Select(browser.find_element(By.ID, 'direction')).select_by_value(''))
    assert np.array_equal(shown(browser, 'person-image'), sample)
    act(browser, lambda: Select(browser.find_element(By.ID, 'direction')).select_by_value('smile'))
    assert np.array_equal(shown(browser, 'person-image'), sample)
    act(browser, lambda: press(browser, 'strength', Keys.ARROW_RIGHT, 20))
    assert changed(shown(browser, 'person-image'), sample)
    act(browser, lambda: press(browser, 'strength', Keys.ARROW_LEFT, 20))
    assert browser.find_element(By.ID, 'strength').get_attribute('value') == '0'
    assert np.array_equal(shown(browser, 'person-image'), sample)

    browser.save_screenshot(str(tmp_path / 'viewer.png'))
    assert PIL.Image.open(tmp_path / 'viewer.png').size[0] > 0
    target = os.environ.get('EG3D_VIEWER_SCREENSHOT')
    if target:
        with dnnlib.util.atomic_write_path(Path(target)) as tmp:
            shutil.copyfile(tmp_path / 'viewer.png', tmp)

    # A bad adapter file shows its error in the page; the viewer keeps serving.
    browser.find_element(By.ID, 'adapter-path').send_keys(str(files['other']))
    browser.find_element(By.ID, 'adapter-load').click()
    WebDriverWait(browser, TIMEOUT_S).until(lambda d: d.find_element(By.ID, 'errors').text)
    error = browser.find_element(By.ID, 'errors').text
    assert str(files['other']) in error and 'different base generator' in error
    assert [o.get_attribute('value') for o in Select(browser.find_element(By.ID, 'identity')).options] == ['', 'ann', 'ben']
    act(browser, lambda: press(browser, 'yaw', Keys.ARROW_LEFT, 10))  # a render clears the message


@needs_browser
def test_a_bad_network_is_shown_in_the_page(tmp_path, browser):
    junk = tmp_path / 'junk.pkl'
    junk.write_bytes(b'no pickle in here')
    process, url = start_viewer(['--network', junk, '--device=cpu'])
    try:
        browser.get(url)
        WebDriverWait(browser, TIMEOUT_S).until(lambda d: d.find_element(By.ID, 'errors').text)
        assert 'junk.pkl' in browser.find_element(By.ID, 'errors').text
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_download_endpoints_and_refusals(viewer_url, files):
    view = urllib.parse.quote(json.dumps({'identity': 'ann', 'seed': 2}))
    with urllib.request.urlopen(f'{viewer_url}api/download/image?view={view}', timeout=TIMEOUT_S) as response:
        assert response.headers['Content-Type'] == 'image/png'
        assert response.headers['Content-Disposition'] == 'attachment; filename="ann.png"'
        assert PIL.Image.open(io.BytesIO(response.read())).size == (128, 128)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(urllib.request.Request(f'{viewer_url}api/info', headers={'Host': 'evil.example'}),
                               timeout=TIMEOUT_S)
    assert refused.value.code == 403
    with pytest.raises(urllib.error.HTTPError) as bad:
        urllib.request.urlopen(f'{viewer_url}api/download/image?view=%7Bnot-json', timeout=TIMEOUT_S)
    assert bad.value.code == 400 and 'not valid JSON' in json.loads(bad.value.read())['error']


def test_other_hosts_need_an_explicit_flag(files):
    result = CliRunner().invoke(viewer.main, ['--network', str(files['base']), '--host', '0.0.0.0'])
    assert result.exit_code != 0 and '--allow-remote' in result.output
