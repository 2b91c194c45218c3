// esbuild entry for the browser test: exposes the real realtime-js as window.RealtimeClient.
import { RealtimeClient } from '@supabase/realtime-js'
window.RealtimeClient = RealtimeClient
