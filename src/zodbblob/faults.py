"""A TCP proxy on loopback that makes an S3-API server misbehave.

The object store's fault tests put a `FaultProxy` between the client
(boto3) and a real S3-API server on 127.0.0.1 and switch, while the test
runs, what the proxy does; no mocks::

    with FaultProxy(server_address) as proxy:
        s3 = boto3.client('s3', endpoint_url='http://%s:%d' % proxy.address,
                          ...)
        proxy.mode = error(503, 'SlowDown')
        proxy.disconnect()          # boto3 pools its connections
        ...                         # every request is answered 503
        assert proxy.requests <= 5  # the retries were bounded
        proxy.mode = PASS

A mode applies to the connections the proxy accepts after it is set;
those open keep theirs (`disconnect` closes them):

`PASS`
    Bytes both ways, unchanged (the default).
`REFUSE`
    Connecting fails with ECONNREFUSED: the listening socket is closed,
    the port kept by a bound socket that does not listen, which listens
    when the mode changes.  A refusal, not accept-and-close, because a
    client tells "nobody listens" (botocore: ``EndpointConnectionError``)
    from "the server hung up" (``ConnectionClosedError``).
`RESET`
    Accept, then close with RST (``SO_LINGER`` 0).
`STALL`
    Accept and read what the client sends; answer nothing.  A stalled
    connection is closed when the mode changes, or at `stop`.
``error(status, code)``
    Answer each HTTP request with that status and an S3 XML error body
    (``<Error><Code>SlowDown</Code>...``) once the request is read whole:
    its head, then a ``Content-Length`` body or a ``Transfer-Encoding:
    chunked`` one (botocore's streaming uploads over https; over http it
    sends ``Content-Length``).  ``Expect: 100-continue`` (botocore's
    uploads) is answered ``100 Continue`` first, so the body comes.
    Keep-alive is honoured, as S3 does for its errors: a client retries
    on the connection it has, and `requests` counts every attempt.  A
    client's ``Connection: close``, or HTTP/1.0, closes after the answer.
``cut_response_after(n)``
    Pass, but close the connection after n bytes from the server (a
    server dying mid-download): n bytes of all the answers on that
    connection, so a pooled one may die in its second answer.
``cut_request_after(n)``
    Pass, but close the connection after n bytes from the client (a
    server dying mid-upload), counted the same way.

`connections` counts the connections accepted, `requests` the requests
whose head came whole (all modes but REFUSE and RESET follow the HTTP
framing); `reset_counts` zeroes both.  A connection gets the mode set
when the proxy accepts it, which may be after the client's connect()
returned: `wait_for` waits for the counts to reach given numbers.
It listens on 127.0.0.1 and forwards to loopback only.  `stop` closes
every connection and joins every thread it started.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import logging
import selectors
import socket
import struct
import threading
import uuid
from http import HTTPStatus
from xml.sax.saxutils import escape

log = logging.getLogger(__name__)

LISTEN_HOST = '127.0.0.1'
CHUNK = 65536
JOIN_TIMEOUT = 10.0
CONNECT_TIMEOUT = 5.0
MAX_HEAD = 65536
MESSAGES = {'SlowDown': 'Please reduce your request rate.',
            'InternalError': 'We encountered an internal error.',
            'AccessDenied': 'Access Denied'}


@dataclasses.dataclass(frozen=True)
class Mode:
    """What the proxy does with a new connection; see the module doc."""

    name: str
    status: int = 0
    code: str = ''
    message: str = ''
    n: int = 0


PASS = Mode('pass')
REFUSE = Mode('refuse')
RESET = Mode('reset')
STALL = Mode('stall')
NAMED = {m.name: m for m in (PASS, REFUSE, RESET, STALL)}


def error(status: int, code: str, message: str | None = None) -> Mode:
    """Answer every request with `status` and an S3 error `code`."""
    if not 400 <= status <= 599:
        raise ValueError(f'HTTP status {status!r} for a fault: want 400-599')
    if message is None:
        message = MESSAGES.get(code, code)
    return Mode('error', status=status, code=code, message=message)


def cut_response_after(n: int) -> Mode:
    """Close each connection after n bytes of the server's answer."""
    return Mode('cut_response', n=byte_count(n))


def cut_request_after(n: int) -> Mode:
    """Close each connection after n bytes of the client's request."""
    return Mode('cut_request', n=byte_count(n))


def byte_count(n: int) -> int:
    if n < 0:
        raise ValueError(f'cut after {n} bytes: want 0 or more')
    return n


class Request:
    """The head of one HTTP request, as `RequestFraming` found it."""

    def __init__(self, head: bytes):
        lines = head.decode('latin-1').split('\r\n')
        parts = lines[0].split(' ')
        if len(parts) != 3 or not parts[2].startswith('HTTP/'):
            raise ValueError(f'HTTP request line {lines[0]!r}: '
                             'want METHOD TARGET HTTP/x.y')
        self.method, self.target, self.version = parts
        self.headers = {}
        for line in lines[1:]:
            name, colon, value = line.partition(':')
            if not colon:
                raise ValueError(f'HTTP header line {line!r}: want name:value')
            self.headers[name.strip().lower()] = value.strip().lower()
        get = self.headers.get
        self.chunked = 'chunked' in get('transfer-encoding', '')
        self.length = int(get('content-length', 0) or 0)
        self.has_body = self.chunked or self.length > 0
        connection = get('connection', '')
        self.keep_alive = ('keep-alive' in connection
                           if self.version == 'HTTP/1.0'
                           else 'close' not in connection)


class RequestFraming:
    """Follows a client's byte stream from one HTTP request to the next.

    `feed` takes bytes as they come and returns the events they
    complete: ``('head', Request)`` when a request's headers are whole,
    ``('end', Request)`` when its body is.  Bodies are counted, never
    kept, so an upload passing through costs no memory.
    """

    def __init__(self):
        self.buffer = b''
        self.state = 'head'
        self.request = None
        self.left = 0

    def feed(self, data: bytes) -> list[tuple[str, Request]]:
        self.buffer += data
        events = []
        while self.step(events):
            pass
        return events

    def step(self, events) -> bool:
        """Consume one piece of the buffer; False when it needs more."""
        if self.state == 'head':
            end = self.buffer.find(b'\r\n\r\n')
            if end < 0:
                if len(self.buffer) > MAX_HEAD:
                    raise ValueError(f'HTTP head over {MAX_HEAD} bytes')
                return False
            head, self.buffer = self.buffer[:end], self.buffer[end + 4:]
            if not head:
                return True  # a blank line between requests
            self.request = Request(head)
            events.append(('head', self.request))
            if self.request.chunked:
                self.state = 'size'
            else:
                self.state, self.left = 'body', self.request.length
            return True
        if self.state in ('body', 'data'):
            if self.left and not self.buffer:
                return False
            taken = min(self.left, len(self.buffer))
            self.buffer = self.buffer[taken:]
            self.left -= taken
            if self.left:
                return False
            if self.state == 'data':
                self.state = 'data-end'
                return True
            events.append(('end', self.request))
            self.state = 'head'
            return True
        line, found, rest = self.buffer.partition(b'\r\n')
        if not found:
            return False
        self.buffer = rest
        if self.state == 'data-end':
            if line:
                raise ValueError('HTTP chunk not ended by CRLF')
            self.state = 'size'
        elif self.state == 'size':
            size = int(line.split(b';')[0].strip(), 16)
            if size:
                self.state, self.left = 'data', size
            else:
                self.state = 'trailer'
        elif not line:  # the blank line that ends the trailer
            events.append(('end', self.request))
            self.state = 'head'
        return True


def error_answer(mode: Mode, request: Request) -> bytes:
    """The bytes of an S3 error answer to `request`."""
    request_id = uuid.uuid4().hex[:16].upper()
    body = ('<?xml version="1.0" encoding="UTF-8"?>\n'
            f'<Error><Code>{escape(mode.code)}</Code>'
            f'<Message>{escape(mode.message)}</Message>'
            f'<Resource>{escape(request.target)}</Resource>'
            f'<RequestId>{request_id}</RequestId></Error>').encode()
    try:
        reason = HTTPStatus(mode.status).phrase
    except ValueError:
        reason = mode.code
    connection = 'keep-alive' if request.keep_alive else 'close'
    head = (f'HTTP/1.1 {mode.status} {reason}\r\n'
            'Content-Type: application/xml\r\n'
            f'Content-Length: {len(body)}\r\n'
            f'x-amz-request-id: {request_id}\r\n'
            f'Connection: {connection}\r\n\r\n').encode()
    return head if request.method == 'HEAD' else head + body


class Link:
    """One accepted connection, and the one to the server if any."""

    def __init__(self, client: socket.socket, mode: Mode):
        self.client = client
        self.mode = mode
        self.server = None
        self.lock = threading.Lock()
        self.closed = False

    def shutdown(self):
        """Wake every thread blocked on this link's sockets."""
        with self.lock:
            self.closed = True
            for sock in (self.client, self.server):
                if sock is not None:
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass  # not connected, or already shut

    def close(self):
        self.shutdown()
        self.client.close()
        if self.server is not None:
            self.server.close()


def loopback(host: str) -> bool:
    try:
        return host == 'localhost' or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class FaultProxy:
    """A TCP proxy on 127.0.0.1 to `target` whose `mode` a test switches."""

    def __init__(self, target: tuple[str, int], host: str = LISTEN_HOST,
                 port: int = 0):
        if host != LISTEN_HOST:
            raise ValueError(f'FaultProxy listen address {host!r}: '
                             f'only {LISTEN_HOST} is allowed')
        if not loopback(target[0]):
            raise ValueError(f'FaultProxy target {target[0]!r}: '
                             'want a loopback address')
        self.target = tuple(target)
        self.port = port
        self.address = None
        self._mode = PASS
        self.connections = 0
        self.requests = 0
        self.lock = threading.Lock()
        self.counted = threading.Condition(self.lock)
        self.links = set()
        self.threads = set()
        self.listener = None
        self.listening = False
        self.stopping = False
        self.wake_r, self.wake_w = socket.socketpair()
        self.acceptor = None

    def start(self) -> FaultProxy:
        self.listener = self.bound_socket()
        self.address = self.listener.getsockname()
        self.listener.listen(64)
        self.listening = True
        self.acceptor = threading.Thread(
            target=self.accept_loop, daemon=True,
            name=f'FaultProxy accept {self.address[1]}')
        self.acceptor.start()
        return self

    def stop(self):
        """Close every connection; join every thread, or raise."""
        self.stopping = True
        self.wake()
        if self.acceptor is not None:
            self.acceptor.join(JOIN_TIMEOUT)
        with self.lock:
            links = list(self.links)
            threads = list(self.threads)
        for link in links:
            link.shutdown()
        for thread in threads:
            thread.join(JOIN_TIMEOUT)
        for link in links:
            link.close()
        if self.listener is not None:
            self.listener.close()
        self.wake_r.close()
        self.wake_w.close()
        alive = [t.name for t in threads + [self.acceptor]
                 if t is not None and t.is_alive()]
        if alive:
            raise RuntimeError(f'FaultProxy {self.address}: threads still '
                               f'running after stop: {alive}')

    __enter__ = start

    def __exit__(self, *exc_info):
        self.stop()

    @property
    def mode(self) -> Mode:
        return self._mode

    @mode.setter
    def mode(self, mode: Mode | str):
        if isinstance(mode, str):
            if mode not in NAMED:
                raise ValueError(f'FaultProxy mode {mode!r}: want one of '
                                 f'{sorted(NAMED)}, or a Mode')
            mode = NAMED[mode]
        with self.lock:
            self._mode = mode
            stalled = [link for link in self.links
                       if link.mode.name == 'stall']
        if mode.name != 'stall':
            for link in stalled:
                link.shutdown()
        self.wake()

    def disconnect(self):
        """Close the open connections, as a server restarting would; a
        client that pools them opens new ones, in the mode now set."""
        with self.lock:
            links = list(self.links)
        for link in links:
            link.shutdown()

    def reset_counts(self):
        with self.lock:
            self.connections = self.requests = 0

    def count_request(self):
        with self.lock:
            self.requests += 1
            self.counted.notify_all()

    def wait_for(self, connections: int = 0, requests: int = 0,
                 timeout: float = JOIN_TIMEOUT):
        """Wait until that many connections and requests were counted."""
        with self.lock:
            if not self.counted.wait_for(
                    lambda: (self.connections >= connections
                             and self.requests >= requests), timeout):
                raise TimeoutError(
                    f'FaultProxy {self.address}: {self.connections} '
                    f'connections, {self.requests} requests after '
                    f'{timeout} s; waited for {connections}, {requests}')

    def bound_socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        port = self.address[1] if self.address else self.port
        try:
            sock.bind((LISTEN_HOST, port))
        except OSError as e:
            sock.close()
            raise OSError(e.errno, f'FaultProxy cannot listen on '
                          f'{LISTEN_HOST}:{port}: {e.strerror}') from None
        return sock

    def wake(self):
        try:
            self.wake_w.send(b'.')
        except OSError:
            pass  # stopped: nobody to wake

    def accept_loop(self):
        with selectors.DefaultSelector() as selector:
            selector.register(self.wake_r, selectors.EVENT_READ)
            selector.register(self.listener, selectors.EVENT_READ)
            while not self.stopping:
                self.follow_refusal(selector)
                for key, _ in selector.select():
                    if key.fileobj is self.wake_r:
                        self.wake_r.recv(CHUNK)
                    elif not self.stopping:
                        self.accept_one()

    def follow_refusal(self, selector):
        """Stop or start listening as REFUSE says, keeping the port."""
        refuse = self._mode.name == 'refuse'
        if refuse and self.listening:
            selector.unregister(self.listener)
            # Closing the listener is what makes connect() meet a refusal;
            # the socket bound again at once, but not listening, keeps the
            # port ours, so the address holds when the mode changes back.
            self.listener.close()
            self.listener = self.bound_socket()
            self.listening = False
        elif not refuse and not self.listening:
            self.listener.listen(64)
            self.listening = True
            selector.register(self.listener, selectors.EVENT_READ)

    def accept_one(self):
        try:
            client, _ = self.listener.accept()
        except OSError:
            return
        with self.lock:
            mode = self._mode
            self.connections += 1
            self.counted.notify_all()
        if mode.name in ('reset', 'refuse'):
            if mode.name == 'reset':
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                  struct.pack('ii', 1, 0))
            client.close()  # refuse: accepted as the listener closed
            return
        link = Link(client, mode)
        handler = self.answer if mode.name in ('stall', 'error') else self.relay
        with self.lock:
            self.links.add(link)
        self.spawn(self.serve, link, handler)

    def spawn(self, function, *args):
        thread = threading.Thread(
            target=function, args=args, daemon=True,
            name=f'FaultProxy {self.address[1]} {function.__name__}')
        with self.lock:  # started under the lock: stop never joins a
            self.threads.add(thread)  # thread not yet started
            thread.start()

    def serve(self, link: Link, handler):
        try:
            handler(link)
        except Exception:
            log.debug('FaultProxy %s: connection ended', self.address,
                      exc_info=True)
        finally:
            link.close()
            with self.lock:
                self.links.discard(link)
                self.threads.discard(threading.current_thread())

    def received(self, sock: socket.socket) -> bytes:
        try:
            return sock.recv(CHUNK)
        except OSError:
            return b''

    def note(self, framing: RequestFraming | None, data: bytes):
        """Count the requests that `data` begins; None once lost."""
        if framing is None:
            return None
        try:
            events = framing.feed(data)
        except ValueError:
            return None  # not HTTP as we know it: stop counting
        for kind, _ in events:
            if kind == 'head':
                self.count_request()
        return framing

    def answer(self, link: Link):
        """STALL and error: read the requests; answer nothing, or errors."""
        framing = RequestFraming()
        while data := self.received(link.client):
            if link.mode.name == 'stall':
                framing = self.note(framing, data)
                continue
            for kind, request in framing.feed(data):
                if kind == 'head':
                    self.count_request()
                    if (request.has_body and '100-continue'
                            in request.headers.get('expect', '')):
                        link.client.sendall(b'HTTP/1.1 100 Continue\r\n\r\n')
                    continue
                link.client.sendall(error_answer(link.mode, request))
                if not request.keep_alive:
                    return

    def relay(self, link: Link):
        try:
            # Bounded, as a connect cannot be woken: `stop` waits for it.
            server = socket.create_connection(self.target, CONNECT_TIMEOUT)
            server.settimeout(None)
        except OSError:
            log.debug('FaultProxy %s: target %s unreachable', self.address,
                      self.target)
            return
        with link.lock:
            link.server = server
            if link.closed:  # stopped while connecting
                server.shutdown(socket.SHUT_RDWR)
                return
        answer = threading.Thread(
            target=self.pump, args=(link, server, link.client, None),
            daemon=True, name=f'FaultProxy {self.address[1]} pump')
        with self.lock:
            self.threads.add(answer)
            answer.start()
        try:
            self.pump(link, link.client, server, RequestFraming())
        finally:
            answer.join(JOIN_TIMEOUT)
            with self.lock:
                self.threads.discard(answer)

    def pump(self, link: Link, source, sink, framing):
        """Bytes one way until EOF or a cut; `framing` on the client's."""
        cut = 'cut_request' if framing else 'cut_response'
        left = link.mode.n if link.mode.name == cut else None
        while data := self.received(source):
            # Counted before forwarded: a request is counted before its
            # answer can reach the client.
            if left is not None and len(data) >= left:
                self.note(framing, data[:left])
                self.forward(sink, data[:left])
                # Dead mid-transfer.  The FIN goes after the bytes sent;
                # what the client still sends is read away first, so the
                # close sends no RST that could overtake them.
                half_close(link.client)
                drain(link.client)
                break
            if left is not None:
                left -= len(data)
            framing = self.note(framing, data)
            if not self.forward(sink, data):
                break
        else:
            half_close(sink)
            return
        link.shutdown()

    def forward(self, sock: socket.socket, data: bytes) -> bool:
        try:
            return sock.sendall(data) is None
        except OSError:
            return False


def half_close(sock: socket.socket):
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass  # the other side went first


def drain(sock: socket.socket):
    sock.setblocking(False)
    try:
        while sock.recv(CHUNK):
            pass
    except OSError:
        pass  # nothing more to read now
    finally:
        sock.setblocking(True)
