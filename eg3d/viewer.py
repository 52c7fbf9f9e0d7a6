"""Local browser viewer of a (personalized) EG3D: orbit the face, base vs personalized, identities, samples, edits.

    python viewer.py --network=base.pkl --adapter=alice.safetensors --adapter=bob.safetensors \\
        --dataset=../datasets/alice --direction=glasses.npy
    # then open http://127.0.0.1:7860/ (on a remote GPU machine: ssh -L 7860:127.0.0.1:7860 host)

A small standard-library HTTP server with one page (viewer_page.html, plain HTML + JS): the page sends
the view it wants as JSON and gets PNG images back; downloads (image, orbit video, mesh) are plain GETs.
It listens on 127.0.0.1 unless --host names another address together with --allow-remote. Bad input
(a missing file, an adapter of another base, a pickle that is no EG3D) is shown in the page and printed
here; the server keeps running. See docs/viewer.md.
"""

import base64
import io
import ipaddress
import json
import socket
import sys
import traceback
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

import click
import PIL.Image

import shape_utils
from training import inference as inf
from viewer_backend import View, ViewerBackend

PAGE = Path(__file__).resolve().parent / 'viewer_page.html'
LOOPBACK_NAMES = ('localhost', '127.0.0.1', '::1', '[::1]')
MAX_BODY_BYTES = 1 << 16


def log(message: str) -> None:
    click.echo(f'viewer: {message}', err=True)


def png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format='PNG')
    return buffer.getvalue()


def png_data_url(image) -> Optional[str]:
    return None if image is None else 'data:image/png;base64,' + base64.b64encode(png_bytes(image)).decode('ascii')


def is_loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ViewerServer(ThreadingHTTPServer):
    """The HTTP server with the backend (None when the network could not be loaded: `startup_error` says why)."""
    daemon_threads = True

    def __init__(self, address, backend: Optional[ViewerBackend], startup_error: Optional[str], allow_remote: bool):
        self.address_family = socket.AF_INET6 if ':' in address[0] else socket.AF_INET
        super().__init__(address, ViewerHandler)
        self.backend = backend
        self.startup_error = startup_error
        self.allow_remote = allow_remote

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f'http://{"[" + host + "]" if ":" in host else host}:{port}/'


class ViewerHandler(BaseHTTPRequestHandler):
    """Routes: GET / (the page), GET /api/info, POST /api/render, POST /api/identities,
    GET /api/download/{image,video,mesh}?view=<JSON>. Errors answer {"error": message}."""
    server: ViewerServer

    def log_message(self, format, *args):  # pylint: disable=redefined-builtin
        pass  # one line per request would drown the error messages

    def do_GET(self):  # pylint: disable=invalid-name
        self._answer(self._get)

    def do_POST(self):  # pylint: disable=invalid-name
        self._answer(self._post)

    def _answer(self, route) -> None:
        """Run a route; an InputError is a 400 with its message, anything else a 500; both are logged."""
        try:
            if not self._host_allowed():
                raise PermissionError(f'Host {self.headers.get("Host")!r} refused: the viewer answers only '
                                      'localhost (start it with --allow-remote to serve other names)')
            route(urllib.parse.urlsplit(self.path))
        except inf.InputError as e:
            log(f'error: {e}')
            self._send_json({'error': str(e)}, HTTPStatus.BAD_REQUEST)
        except PermissionError as e:
            log(f'error: {e}')
            self._send_json({'error': str(e)}, HTTPStatus.FORBIDDEN)
        except Exception as e:  # pylint: disable=broad-except
            log(f'internal error on {self.command} {self.path}:\n{traceback.format_exc()}')
            self._send_json({'error': f'internal error: {type(e).__name__}: {e} (details in the terminal)'},
                            HTTPStatus.INTERNAL_SERVER_ERROR)

    def _host_allowed(self) -> bool:
        """Refuse other Host names while serving localhost only (a page elsewhere cannot reach the viewer by DNS)."""
        if self.server.allow_remote:
            return True
        host = urllib.parse.urlsplit('//' + self.headers.get('Host', '')).hostname or ''
        return is_loopback(host)

    def _backend(self) -> ViewerBackend:
        if self.server.backend is None:
            raise inf.InputError(self.server.startup_error)
        return self.server.backend

    def _get(self, url) -> None:
        if url.path in ('/', '/index.html'):
            self._send(PAGE.read_bytes(), 'text/html; charset=utf-8')
        elif url.path == '/api/info':
            if self.server.backend is None:
                self._send_json({'errors': [self.server.startup_error], 'identities': [], 'latents': [],
                                 'directions': [], 'ready': False})
            else:
                self._send_json(dict(self._backend().info(), ready=True))
        elif url.path.startswith('/api/download/'):
            self._download(url.path.rsplit('/', 1)[-1], urllib.parse.parse_qs(url.query).get('view', ['{}'])[0])
        else:
            self._send_json({'error': f'no page {url.path}'}, HTTPStatus.NOT_FOUND)

    def _post(self, url) -> None:
        body = self._read_json()
        if url.path == '/api/render':
            base, personalized = self._backend().render_pair(View.from_json(body))
            self._send_json({'base': png_data_url(base), 'personalized': png_data_url(personalized)})
        elif url.path == '/api/identities':
            path = body.get('path') if isinstance(body, dict) else None
            if not isinstance(path, str) or not path.strip():
                raise inf.InputError('type the path of an adapter file (.safetensors) on this machine')
            name = self._backend().add_identity(path.strip())
            log(f'loaded identity {name} from {path.strip()}')
            self._send_json(dict(self._backend().info(), added=name))
        else:
            self._send_json({'error': f'no endpoint {url.path}'}, HTTPStatus.NOT_FOUND)

    def _download(self, kind: str, view_json: str) -> None:
        backend = self._backend()
        view = View.from_json(self._parse_json(view_json))
        stem = view.identity or 'base'
        if kind == 'image':
            self._send(png_bytes(backend.image(view)), 'image/png', f'{stem}.png')
        elif kind == 'video':
            self._send(backend.video(view), 'video/mp4', f'{stem}-orbit.mp4')
        elif kind == 'mesh':
            self._send(backend.mesh(view), 'application/octet-stream', f'{stem}.ply')
        else:
            raise inf.InputError(f'nothing to download as {kind!r}: use image, video or mesh')

    @staticmethod
    def _parse_json(text: str):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise inf.InputError(f'the request is not valid JSON: {e}') from e

    def _read_json(self):
        length = int(self.headers.get('Content-Length') or 0)
        if length > MAX_BODY_BYTES:
            raise inf.InputError(f'request body of {length} bytes is too large')
        return self._parse_json(self.rfile.read(length).decode('utf-8') or '{}')

    def _send_json(self, data: dict, status: HTTPStatus = HTTPStatus.OK) -> None:
        self._send(json.dumps(data).encode('utf-8'), 'application/json', status=status)

    def _send(self, payload: bytes, content_type: str, filename: Optional[str] = None,
              status: HTTPStatus = HTTPStatus.OK) -> None:
        self.send_response(status)
        self.send_header('Content-Type', content_type)
        self.send_header('Content-Length', str(len(payload)))
        self.send_header('Cache-Control', 'no-store')
        if filename:
            self.send_header('Content-Disposition', f'attachment; filename="{filename}"')
        self.end_headers()
        self.wfile.write(payload)


def load_backend(**kwargs) -> tuple:
    """(backend, None), or (None, message) when the network itself cannot be used."""
    try:
        return ViewerBackend(**kwargs), None
    except inf.InputError as e:
        return None, str(e)


@click.command()
@click.option('--network', 'network_pkl', required=True, metavar='PKL', help='Base generator pkl (EG3D layout)')
@click.option('--adapter', 'adapter_paths', multiple=True, metavar='FILE',
              help='Adapter file of one identity; repeat for several identities on the one base')
@click.option('--dataset', metavar='DIR', help='Identity folder: its *_latent.npy are the dataset latents and '
              'the anchors of alpha-space samples')
@click.option('--direction', 'direction_paths', multiple=True, metavar='NPY',
              help='Edit direction (.npy, W or W+, as edit.py writes); repeatable')
@click.option('--device', default='auto', show_default=True, help='auto (the GPU when there is one), cpu, cuda, ...')
@click.option('--nrr', 'neural_rendering_resolution', type=click.IntRange(min=4), default=None,
              help='Neural rendering resolution (default: the generator\'s)')
@click.option('--fov', 'fov_deg', type=float, default=inf.DEFAULT_FOV_DEG, show_default=True,
              help='Field of view (degrees)')
@click.option('--max-identities', type=click.IntRange(min=1), default=8, show_default=True,
              help='Adapter slots kept on the base (identities loaded at once)')
@click.option('--anchors-per-sample', type=click.IntRange(min=0), default=3, show_default=True,
              help='Alpha-space: anchors combined per sample (0 = all)')
@click.option('--beta', type=click.FloatRange(min=0), default=0.0, show_default=True,
              help='Alpha-space dilation margin')
@click.option('--video-frames', type=click.IntRange(min=1), default=60, show_default=True,
              help='Frames of the orbit video download')
@click.option('--video-fps', type=click.IntRange(min=1), default=24, show_default=True)
@click.option('--shape-res', type=click.IntRange(min=8), default=128, show_default=True,
              help='Density grid of the mesh download (voxels per side)')
@click.option('--shape-level', type=float, default=shape_utils.DEFAULT_LEVEL, show_default=True,
              help='Iso-level of the mesh download (raw density)')
@click.option('--host', default='127.0.0.1', show_default=True, help='Address to listen on')
@click.option('--port', type=click.IntRange(min=0, max=65535), default=7860, show_default=True,
              help='Port (0: any free port)')
@click.option('--allow-remote', is_flag=True, help='Needed to listen on an address other than loopback: '
              'anyone who reaches it can use the viewer and load files of this machine by path')
def main(network_pkl, adapter_paths, dataset, direction_paths, device, neural_rendering_resolution, fov_deg,
         max_identities, anchors_per_sample, beta, video_frames, video_fps, shape_res, shape_level, host, port,
         allow_remote):
    """Serve the viewer page on http://HOST:PORT/."""
    if not is_loopback(host) and not allow_remote:
        raise click.ClickException(f'--host={host} exposes the viewer beyond this machine; pass --allow-remote too '
                                   '(or keep 127.0.0.1 and use ssh -L port forwarding, docs/viewer.md)')
    backend, startup_error = load_backend(
        network_pkl=network_pkl, adapter_paths=adapter_paths, dataset=dataset, direction_paths=direction_paths,
        device=device, neural_rendering_resolution=neural_rendering_resolution, fov_deg=fov_deg,
        max_identities=max_identities, anchors_per_sample=anchors_per_sample, beta=beta,
        video_frames=video_frames, video_fps=video_fps, shape_res=shape_res, shape_level=shape_level)
    for message in [startup_error] if backend is None else backend.errors:
        log(f'error: {message}')
    if backend is not None:
        info = backend.info()
        log(f'{network_pkl} on {info["device"]}; identities: {", ".join(info["identities"]) or "none"}')
    try:
        server = ViewerServer((host, port), backend, startup_error, allow_remote)
    except OSError as e:
        raise click.ClickException(f'cannot listen on {host}:{port}: {e} (pick another --port)') from e
    click.echo(f'EG3D viewer at {server.url} (Ctrl+C stops it)', file=sys.stdout)
    sys.stdout.flush()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == '__main__':
    main()  # pylint: disable=no-value-for-parameter
