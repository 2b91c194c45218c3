// Entry of the browser bundle (page/realtime-js.js, made by build.sh on the deploying machine): the stock
// realtime-js from npm, unchanged, as one ES module. Not part of the function itself: index.ts never imports it.
export { RealtimeClient } from "npm:@supabase/realtime-js@2.109.0";
