// The plugin's entry point (bundled by esbuild into dist/ip2p-panel.js).
import * as host from "./host.js";
import { mountPanel } from "./panel.js";

host.onPanelShow(() => mountPanel({ host }));
