import json
import os
import time

import paho.mqtt.client as mqtt

device, port = os.environ.get("DEVICE_ID", "sensor-1"), int(os.environ.get("MQTT_PORT", "1884"))
client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv311)
client.username_pw_set(device, os.environ["DEVICE_TOKEN"])  # from `gateway devices add`
client.will_set(f"devices/{device}/status", "offline", qos=1)  # sent by the broker if we vanish
client.connect("127.0.0.1", port, keepalive=30)
client.loop_start()
client.publish(f"devices/{device}/status", "online", qos=1)
for seq in range(int(os.environ.get("COUNT", "1000000"))):
    beat = {"seq": seq, "msg_id": f"{device}-{time.time_ns()}", "ts": time.time(), "cpu": 12.5}
    client.publish(f"devices/{device}/heartbeat", json.dumps(beat), qos=1).wait_for_publish()
    time.sleep(float(os.environ.get("INTERVAL", "5")))
