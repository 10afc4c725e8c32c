#!/usr/bin/env python3
"""An independent MQTT client for the interop tests: Eclipse Paho (paho-mqtt 2.x).

Connects over mutual TLS with the given certificate, then publishes one file at QoS 1 and waits
for its PUBACK, or subscribes to one topic filter and waits for its SUBACK; with --hold, then
stays connected until the server closes the connection or the time is up. Never reconnects.
Prints one JSON line:

  {"connected": bool, "connack": int|null, "puback": int|null, "suback": [int]|null,
   "disconnected": int|null, "error": str|null}

(reason codes as integers, MQTT 5 codes also under MQTT 3.1.1 as paho reports them: a refused
3.1.1 CONNACK 5 is 135; a 3.1.1 PUBACK has no reason code and is reported as 0;
"disconnected" is set only when the server or the network ended the connection).
Exit status: 0 if the operation was acknowledged with success, 1 if it was refused or the
connection failed, 3 if paho-mqtt is missing.
"""

import argparse
import json
import ssl
import sys
import threading

try:
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion
except ImportError as e:  # pragma: no cover - reported to the Rust test
    print(f"paho-mqtt 2.x is not installed ({e}); install it: pip install 'paho-mqtt>=2,<3'", file=sys.stderr)
    sys.exit(3)


def code(rc):
    """A reason code (paho ReasonCode, int or None) as an int."""
    if rc is None:
        return None
    value = getattr(rc, "value", rc)
    return int(value)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--cafile", required=True)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--client-id", required=True)
    p.add_argument("--mqtt", choices=["3.1.1", "5"], default="5")
    p.add_argument("--topic", required=True)
    p.add_argument("--file", help="payload to publish at QoS 1")
    p.add_argument("--subscribe", action="store_true", help="subscribe to --topic instead of publishing")
    p.add_argument("--hold", type=float, default=0.0,
                   help="after a successful operation, stay connected up to this many seconds "
                        "or until the server closes the connection")
    p.add_argument("--timeout", type=float, default=10.0)
    a = p.parse_args()
    if not a.subscribe and not a.file:
        p.error("--file is required unless --subscribe is given")

    result = {"connected": False, "connack": None, "puback": None, "suback": None,
              "disconnected": None, "error": None}
    done = threading.Event()
    connected = threading.Event()
    closed = threading.Event()
    closing = threading.Event()

    protocol = mqtt.MQTTv5 if a.mqtt == "5" else mqtt.MQTTv311
    # No automatic reconnect: each connection attempt is one the test expects (and one security
    # event when it is refused).
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=a.client_id, protocol=protocol,
                         reconnect_on_failure=False)
    client.tls_set(ca_certs=a.cafile, certfile=a.cert, keyfile=a.key,
                   cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)

    def on_connect(_c, _u, _flags, reason_code, _props):
        result["connack"] = code(reason_code)
        result["connected"] = not reason_code.is_failure
        connected.set()
        if reason_code.is_failure:
            done.set()

    def on_publish(_c, _u, _mid, reason_code, _props):
        result["puback"] = code(reason_code)
        done.set()

    def on_subscribe(_c, _u, _mid, reason_codes, _props):
        result["suback"] = [code(rc) for rc in reason_codes]
        done.set()

    def on_disconnect(_c, _u, _flags, reason_code, _props):
        if not closing.is_set():
            result["disconnected"] = code(reason_code)
        connected.set()
        done.set()
        closed.set()

    client.on_connect = on_connect
    client.on_publish = on_publish
    client.on_subscribe = on_subscribe
    client.on_disconnect = on_disconnect

    ok = False
    try:
        client.connect(a.host, a.port, keepalive=30)
        client.loop_start()
        if not connected.wait(a.timeout):
            result["error"] = "no CONNACK"
        elif result["connected"]:
            if a.subscribe:
                client.subscribe(a.topic, qos=1)
            else:
                with open(a.file, "rb") as f:
                    payload = f.read()
                client.publish(a.topic, payload, qos=1)
            if not done.wait(a.timeout):
                result["error"] = "no acknowledgement"
            if a.subscribe:
                ok = bool(result["suback"]) and all(rc < 0x80 for rc in result["suback"])
            else:
                ok = result["puback"] is not None and result["puback"] < 0x80
            if ok and a.hold > 0:
                closed.wait(a.hold)
            if not closed.is_set():
                closing.set()
                client.disconnect()
        client.loop_stop()
    except (ssl.SSLError, OSError) as e:
        result["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(result), flush=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
