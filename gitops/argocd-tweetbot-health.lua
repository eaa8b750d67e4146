-- Argo CD health check for huggingtweets.dev/TweetBot (resource.customizations.health.huggingtweets.dev_TweetBot).
-- Healthy once the bot is Ready, Degraded when it failed or stalled, Suspended while suspended, else Progressing.
local hs = {status = "Progressing", message = "Waiting for the operator"}
if obj.status == nil then
  return hs
end
if obj.status.observedGeneration ~= nil and obj.metadata.generation ~= nil
    and obj.status.observedGeneration < obj.metadata.generation then
  hs.message = "The operator has not seen the latest spec yet"
  return hs
end
local phase = obj.status.phase or ""
local message = obj.status.lastError or ""
if obj.status.conditions ~= nil then
  for _, condition in ipairs(obj.status.conditions) do
    if condition.type == "Ready" and condition.status == "True" then
      return {status = "Healthy", message = condition.message or "Succeeded"}
    end
    if condition.type == "Stalled" and condition.status == "True" then
      return {status = "Degraded", message = condition.message or message}
    end
  end
end
if phase == "Failed" then
  return {status = "Degraded", message = message}
end
if phase == "Suspended" then
  return {status = "Suspended", message = "spec.suspend is true"}
end
hs.message = phase ~= "" and phase or hs.message
return hs
